"""Evaluate a model on a split: retrieval, zero-shot classification and VQA, as one JSON report.

Keys of the report (all fractions in [0, 1]):

- ``retrieval``: ``i2t_R@1/5/10``, ``t2i_R@1/5/10``, median / mean ranks, ``n_images``, ``n_texts``.
  Images (or clips: "image" stands for either throughout) are encoded query-free; a retrieved
  caption counts when its text equals a ground-truth caption of the image.
- ``classify``: ``top1``, ``top5``, ``n``, ``per_class_top1`` over images with a ``label``; class
  embeddings average the prompt templates (``eval.templates``).
- ``vqa``: ``accuracy``, ``n``, ``per_type`` {type: {accuracy, n}}; the answer is the nearest
  candidate in a bank of the split's canonical answers (each record's ``answer``; or the file
  ``eval.candidates``) encoded by Y + head. The other accepted spellings (``answers``: "2" next to
  "two") still count as hits but are not candidates: they would only add near-duplicates the
  model was never trained towards.
- ``caption`` (needs the model's light decoder, ``vljepa train-decoder``): each image's
  query-free prediction decoded two ways, scored against the image's captions by
  :func:`vljepa.eval.caption.caption_scores` (``cider`` in pycocoevalcap's units, ``bleu4``,
  ``rougeL``): ``nearest`` (the nearest caption of a bank: ``eval.caption_bank``, else the
  captions of the split the decoder was trained on) and ``decoder`` (the light decoder, beam
  ``eval.num_beams``); ``n``, ``bank_size``, and ``examples`` (the first five images' first reference
  and both decodings). ``from_target``: the split's distinct captions decoded from their own target
  embeddings: ``exact`` (equal after :func:`~vljepa.eval.caption.tokenize_caption`), ``facts`` (the
  same objects with the same size, colour and shape, left to right, and the same vertical relation,
  in any paraphrase of the built-in world: :func:`~vljepa.eval.caption.caption_facts`), ``n``.
- ``skipped``: records and images skipped under ``data.on_error=skip``, by reason.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vljepa.config import ConfigError, EvalConfig
from vljepa.data.formats import DataError, SkipReport
from vljepa.data.readers import read_split
from vljepa.data.transforms import unreadable
from vljepa.decode.nearest import CandidateBank
from vljepa.embed import embed_texts, encode_images, predict_batched
from vljepa.eval.caption import caption_facts, caption_scores, tokenize_caption
from vljepa.eval.classify import class_embeddings, classification_metrics
from vljepa.eval.retrieval import build_text_index, retrieval_metrics
from vljepa.eval.vqa import vqa_metrics
from vljepa.models.vljepa import VLJepa

TASKS = ("retrieval", "classify", "vqa", "caption")


def _encode_sharded(model: VLJepa, images: list[str], cfg: EvalConfig, on_error: str, report: SkipReport,
                    accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each process encodes its share of the images; ``gather_for_metrics`` reassembles them."""
    loader = accelerator.prepare_data_loader(DataLoader(list(range(len(images))), batch_size=cfg.batch_size))
    parts = []
    for idx in loader:
        tokens, ok = encode_images(model, [images[i] for i in idx.tolist()], batch_size=cfg.batch_size,
                                   on_error=on_error, report=SkipReport(), precision=cfg.precision)
        parts.append(accelerator.gather_for_metrics((idx, tokens.to(idx.device), ok.to(torch.uint8))))
    order = torch.cat([p[0] for p in parts]).cpu()
    tokens = torch.cat([p[1] for p in parts]).cpu()[order.argsort()]
    ok = torch.cat([p[2] for p in parts]).cpu()[order.argsort()].bool()
    for path, good in zip(images, ok.tolist()):
        if not good:
            report.add(unreadable(path), path)
    return tokens, ok


def evaluate(model: VLJepa, split: str | Path, cfg: EvalConfig, *, on_error: str = "stop", accelerator=None) -> dict:
    """Run ``cfg.tasks`` on the split folder ``split``; returns the report described above.

    With an ``accelerator`` of several processes, the images are encoded in shards and gathered
    with ``gather_for_metrics``; every process then holds the same report.
    """
    unknown = set(cfg.tasks) - set(TASKS)
    if unknown:
        raise ConfigError(f"unknown eval.tasks {sorted(unknown)}; choose from {list(TASKS)}")
    # Read before any encoding, so that a missing decoder or bank fails at once.
    bank_texts = caption_bank_texts(model, cfg) if "caption" in cfg.tasks else []
    model.eval()
    report = SkipReport()
    captions, questions = [], []
    if "retrieval" in cfg.tasks or "classify" in cfg.tasks or "caption" in cfg.tasks:
        captions, skipped = read_split(split, "caption", on_error=on_error)
        report.merge(skipped)
    if "vqa" in cfg.tasks:
        questions, skipped = read_split(split, "vqa", on_error=on_error)
        report.merge(skipped)
    if cfg.max_images:
        first = list(dict.fromkeys([r.image for r in captions] + [r.image for r in questions]))[: cfg.max_images]
        keep = set(first)
        captions = [r for r in captions if r.image in keep]
        questions = [r for r in questions if r.image in keep]
    # Every image is encoded once, whichever tasks use it.
    images = list(dict.fromkeys([r.image for r in captions] + [r.image for r in questions]))
    if accelerator is not None and accelerator.num_processes > 1:
        tokens, ok = _encode_sharded(model, images, cfg, on_error, report, accelerator)
    else:
        tokens, ok = encode_images(model, images, batch_size=cfg.batch_size, on_error=on_error, report=report,
                                   precision=cfg.precision)
    row = {p: i for i, p in enumerate(images) if ok[i]}
    results: dict = {"split": str(split)}
    captions = [r for r in captions if r.image in row]
    if captions:
        preds = predict_batched(model, tokens, [row[r.image] for r in captions], [""] * len(captions),
                                batch_size=cfg.batch_size, precision=cfg.precision)
        if "retrieval" in cfg.tasks:
            texts, image_to_texts = build_text_index([r.captions for r in captions])
            text_emb = embed_texts(model, texts, batch_size=cfg.batch_size, precision=cfg.precision)
            results["retrieval"] = retrieval_metrics(preds, text_emb, image_to_texts)
        if "classify" in cfg.tasks:
            labelled = [i for i, r in enumerate(captions) if r.label]
            if not labelled:
                raise DataError(f"eval.tasks has classify but no record of '{split}' has a label")
            classnames = list(cfg.classnames) or sorted({captions[i].label for i in labelled})
            missing = {captions[i].label for i in labelled} - set(classnames)
            if missing:
                raise DataError(f"labels {sorted(missing)[:5]} of '{split}' are not in eval.classnames")
            class_emb = class_embeddings(classnames, cfg.templates,
                                         lambda t: embed_texts(model, t, precision=cfg.precision))
            labels = [classnames.index(captions[i].label) for i in labelled]
            results["classify"] = classification_metrics(preds[labelled], class_emb, labels, classnames=classnames)
        if "caption" in cfg.tasks:
            results["caption"] = caption_metrics(model, preds, [list(r.captions) for r in captions], bank_texts, cfg)
    questions = [r for r in questions if r.image in row]
    if questions:
        bank = answer_bank(model, candidate_answers(questions), cfg)
        preds = predict_batched(model, tokens, [row[r.image] for r in questions], [r.question for r in questions],
                                batch_size=cfg.batch_size, precision=cfg.precision)
        answers = [texts[0] for texts in bank.decode(preds, k=1)]
        results["vqa"] = vqa_metrics(answers, [r.answers for r in questions], [r.type for r in questions])
    results["skipped"] = report.to_dict()
    return results


def caption_bank_texts(model: VLJepa, cfg: EvalConfig) -> list[str]:
    """The nearest-neighbour caption bank: ``eval.caption_bank`` (a split folder or a text file with one
    caption a line), else the captions of the split the model's decoder was trained on."""
    if getattr(model, "decoder", None) is None:
        raise ConfigError("eval.tasks has caption but this model has no light decoder; train one with "
                          "`vljepa train-decoder --model DIR --data TRAIN_SPLIT`")
    source = cfg.caption_bank or model.decoder_trained_on
    if not source:
        raise ConfigError("eval.tasks has caption but no caption bank: set eval.caption_bank to the training split "
                          "folder (or a text file with one caption a line)")
    path = Path(source)
    if path.is_file():
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif path.is_dir():
        records, _ = read_split(path, "caption")
        texts = [c for r in records for c in r.captions]
    else:
        what = "eval.caption_bank" if cfg.caption_bank else "the decoder's training split"
        raise DataError(f"{what} '{path}' does not exist; set eval.caption_bank to a caption split folder or a "
                        "text file with one caption a line")
    texts = list(dict.fromkeys(texts))
    if not texts:
        raise DataError(f"caption bank '{path}' holds no captions")
    return texts


def caption_metrics(model: VLJepa, preds: torch.Tensor, references: list[list[str]], bank_texts: list[str],
                    cfg: EvalConfig) -> dict:
    """The ``caption`` report (see the module doc) for query-free predictions ``[N, D]`` of N images, with
    ``bank_texts`` (:func:`caption_bank_texts`) as the nearest-neighbour bank."""
    def embed(texts: list[str]) -> torch.Tensor:
        return embed_texts(model, texts, batch_size=cfg.batch_size, precision=cfg.precision)

    bank = CandidateBank.build(bank_texts, embed, batch_size=cfg.batch_size)
    nearest = [texts[0] for texts in bank.decode(preds, k=1)]
    decoded = model.decoder.generate(preds, num_beams=cfg.num_beams, batch_size=cfg.batch_size)
    held_out = list(dict.fromkeys(c for refs in references for c in refs))
    from_target = model.decoder.generate(embed(held_out), num_beams=cfg.num_beams, batch_size=cfg.batch_size)
    n = len(held_out)
    return {
        "nearest": caption_scores(references, nearest),
        "decoder": caption_scores(references, decoded),
        "n": len(references),
        "bank_size": len(bank.texts),
        "from_target": {
            "exact": sum(tokenize_caption(a) == tokenize_caption(b) for a, b in zip(held_out, from_target)) / n,
            "facts": sum(caption_facts(a) == caption_facts(b) for a, b in zip(held_out, from_target)) / n,
            "n": n,
        },
        "examples": [{"reference": refs[0], "nearest": a, "decoder": b}
                     for refs, a, b in zip(references[:5], nearest, decoded)],
    }


def candidate_answers(questions: list) -> list[str]:
    """The default VQA candidates: the distinct canonical answers (``answer``) of the records, sorted.

    Alternative spellings in ``answers`` ("2" for "two") are accepted when scoring but are not
    candidates: the model is trained towards the canonical answer only.
    """
    return sorted({r.answer for r in questions})


def answer_bank(model: VLJepa, answers: list[str], cfg: EvalConfig) -> CandidateBank:
    """Candidate answers (``eval.candidates`` file, else the given answers) encoded by Y + head."""
    if cfg.candidates:
        path = Path(cfg.candidates)
        if not path.is_file():
            raise DataError(f"eval.candidates='{path}' is not a file; give a text file with one answer a line")
        answers = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return CandidateBank.build(answers, lambda t: embed_texts(model, t, precision=cfg.precision),
                               batch_size=cfg.batch_size)


@torch.no_grad()
def answer(model: VLJepa, image: str, question: str, candidates: list[str], *, k: int = 3) -> list[tuple[str, float]]:
    """Answer one question about one image: the top-k candidates with cosine scores."""
    tokens, _ = encode_images(model, [image])
    pred = predict_batched(model, tokens, [0], [question])
    bank = CandidateBank.build(candidates, lambda t: embed_texts(model, t))
    scores, idx = bank.search(pred, k=k)
    return [(bank.texts[i], float(s)) for s, i in zip(scores[0].tolist(), idx[0].tolist())]


def _headline(report: dict) -> list[tuple[str, str]]:
    """(metric, value) rows of one report's headline numbers."""
    rows = []
    if "retrieval" in report:
        m = report["retrieval"]
        for d in ("i2t", "t2i"):
            rows.append((f"retrieval {d} R@1 / R@5 / R@10", " / ".join(f"{m[f'{d}_R@{k}']:.3f}" for k in (1, 5, 10))))
    if "classify" in report:
        rows.append(("zero-shot top-1 / top-5", f"{report['classify']['top1']:.3f} / {report['classify']['top5']:.3f}"))
    if "caption" in report:
        m = report["caption"]
        rows.append(("caption CIDEr nearest / decoder", f"{m['nearest']['cider']:.3f} / {m['decoder']['cider']:.3f}"))
        rows.append(("caption from target: exact / facts",
                     f"{m['from_target']['exact']:.3f} / {m['from_target']['facts']:.3f}  (n={m['from_target']['n']})"))
    if "vqa" in report:
        rows.append(("VQA accuracy", f"{report['vqa']['accuracy']:.3f}  (n={report['vqa']['n']})"))
        for t, v in sorted(report["vqa"]["per_type"].items()):
            rows.append((f"  VQA {t}", f"{v['accuracy']:.3f}  (n={v['n']})"))
    return rows


def format_table(results: dict, reference: dict | None = None) -> str:
    """A plain-text table of the headline numbers of one or more reports ``{split: report}``, with a
    column of ``reference`` reports of the same splits where given."""
    rows = []
    for split, report in results.items():
        ref = dict(_headline(reference.get(split, {}))) if reference else {}
        rows += [(split, metric, value, ref.get(metric, "-")) for metric, value in _headline(report)]
    head = ("split", "metric", "value") + (("reference",) if reference else ())
    widths = [max([len(head[i])] + [len(r[i]) for r in rows]) for i in range(len(head))]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(line, widths)).rstrip()
             for line in [head, tuple("-" * w for w in widths), *[r[:len(head)] for r in rows]]]
    return "\n".join(lines)
