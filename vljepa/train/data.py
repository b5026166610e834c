"""The training data path, in one place: read -> dedupe -> cache frozen towers -> tokenise -> batch.

``build_training_data(model, cfg, accelerator)`` reads every source through the library's readers,
puts images and target texts into tables of distinct items, runs the frozen towers over them once
(cached on disk), tokenises the queries and returns the examples with the collator that turns
lists of example indices into batches (``vljepa.data.collate``). ``training_loader`` wraps them in
a ``DataLoader`` whose order is reproducible from the seed alone (so a resumed run continues it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from vljepa.config import ConfigError, RunConfig, SourceConfig
from vljepa.data.cache import EmbeddingCache
from vljepa.data.collate import Collator, ExampleIndex, Examples, TextTable
from vljepa.data.formats import DataError, SkipReport
from vljepa.data.readers import load_visual, read_source
from vljepa.data.transforms import unreadable, visual_pixels
from vljepa.embed import cached_image_tokens, cached_text_features, pixel_loader
from vljepa.models.vljepa import VLJepa


@dataclass
class TrainingData:
    examples: Examples
    collator: Collator
    images: list[str]
    texts: list[str]
    skipped: SkipReport
    cache_hits: dict[str, bool]
    encode_seconds: float
    mixture: list[float] | None = None  # per-example sampling weights, or None for plain shuffling


def training_sources(cfg: RunConfig) -> list[SourceConfig]:
    """``data.train`` (one imagefolder split, task ``data.task``) followed by ``data.sources``."""
    sources = []
    if cfg.data.train:
        tasks = ["caption", "vqa"] if cfg.data.task == "mixed" else [cfg.data.task]
        sources = [SourceConfig(path=cfg.data.train, format="imagefolder", task=t) for t in tasks]
    sources += list(cfg.data.sources)
    if not sources:
        raise ConfigError("no training data: set data.train to a split folder or list data.sources")
    return sources


def read_training_records(cfg: RunConfig, report: SkipReport) -> list[tuple[SourceConfig, list]]:
    """Every training source's records (bad ones follow ``data.on_error`` and are counted in ``report``)."""
    out = []
    for source in training_sources(cfg):
        records, skipped = read_source(source, on_error=cfg.data.on_error, work_dir=work_dir(cfg))
        report.merge(skipped)
        out.append((source, records))
    return out


def work_dir(cfg: RunConfig) -> Path:
    """Where the frozen-tower cache and unpacked sources live."""
    return Path(cfg.data.cache_dir or Path(cfg.train.output_dir) / "cache")


def build_training_data(model: VLJepa, cfg: RunConfig, accelerator: Accelerator) -> TrainingData:
    """Records -> examples over an image table and a distinct-text table, frozen towers cached."""
    report = SkipReport()
    with accelerator.main_process_first():  # sources in containers are unpacked once, by the main process
        per_source = read_training_records(cfg, report)

    # 1. Dedupe: one table of distinct images (and clips, by their Clip.ref), one of distinct target texts.
    images: dict[str, int] = {}
    texts: dict[str, int] = {}
    chunks: list[list[str]] = []  # texts first seen in each source, cached chunk by chunk
    raw: list[tuple[int, str, tuple[int, ...]]] = []  # (image, query, target choices)
    weights: list[float] = []  # per example: its source's weight shared over the source's examples
    for source, records in per_source:
        first_new = len(texts)
        weights += [source.weight / max(1, len(records))] * len(records)
        for r in records:
            img = images.setdefault(r.image, len(images))
            if source.task == "caption":
                raw.append((img, "", tuple(texts.setdefault(c, len(texts)) for c in r.captions)))
            else:
                raw.append((img, r.question, (texts.setdefault(r.answer, len(texts)),)))
        chunks.append(list(texts)[first_new:])
    image_list, text_list = list(images), list(texts)

    # 2. Frozen towers, encoded once (cached on disk); towers that train run inside every step instead.
    cache = EmbeddingCache(work_dir(cfg)) if cfg.data.cache else None
    precision = cfg.train.precision
    hits: dict[str, bool] = {}
    visual_tokens = None
    t0 = time.time()
    if cfg.data.cache and model.vision.static:
        with accelerator.main_process_first():
            visual_tokens, ok, hits["images"] = cached_image_tokens(
                model, image_list, cache, on_error=cfg.data.on_error, report=report, precision=precision)
    else:
        ok = _check_images(image_list, model.config.vision.num_frames, cfg.data.on_error, report)
    keep = [i for i, (img, _, _) in enumerate(raw) if ok[img]]
    for i in sorted(set(range(len(raw))) - set(keep)):
        report.add("record of an unreadable image", image_list[raw[i][0]])
    raw, weights = [raw[i] for i in keep], [weights[i] for i in keep]
    if not raw:
        raise DataError(f"no usable training records in {', '.join(repr(s.path) for s, _ in per_source)}; "
                        f"{report.summary()}")
    if cfg.data.cache and model.text.static:
        with accelerator.main_process_first():
            parts = []
            for i, chunk in enumerate(c for c in chunks if c):
                feats, hits[f"texts{i}"] = cached_text_features(
                    model, chunk, cache, with_states=model.target_head.reads_states, precision=precision)
                parts.append(feats)
        table = TextTable(**_concat_text_features(parts))
    else:
        tok = model.tokenize(text_list)
        table = TextTable(token_ids=[ids[m.bool()].tolist() for ids, m in zip(tok["input_ids"], tok["attention_mask"])])

    # 3. Queries: token ids with the predictor's tokenizer (and, for a predictor that reads the frozen
    # Y-encoder's token states of the query, those states, encoded once per distinct query).
    queries = sorted({q for _, q, _ in raw if q})
    qids: dict[str, list[int]] = {"": []}
    qtok = model.tokenize_queries(queries) if queries else None
    if qtok is not None:
        for q, ids, m in zip(queries, qtok["query_ids"], qtok["query_mask"]):
            qids[q] = ids[m.bool()].tolist()
    query_table, query_row = None, None
    if queries and model.predictor.reads_query_states and cfg.data.cache and model.text.static:
        with accelerator.main_process_first():
            feats, hits["queries"] = cached_text_features(model, queries, cache, with_states=True, precision=precision,
                                                          max_length=cfg.model.predictor.max_query_len)
        lengths = (feats["offsets"][1:] - feats["offsets"][:-1]).tolist()
        if lengths != [len(qids[q]) for q in queries]:
            raise RuntimeError("the query states do not align with the query tokens")
        # Row 0 is the empty query (query-free examples); query i is row i + 1.
        offsets = torch.cat([feats["offsets"][:1], feats["offsets"]])
        query_table = TextTable(pooled=feats["pooled"], states=feats["states"], offsets=offsets)
        row = {q: i + 1 for i, q in enumerate(queries)}
        query_row = [row.get(r[1], 0) for r in raw]
    encode_seconds = time.time() - t0

    # 4. Examples and the collator that batches them.
    examples = Examples(image=[r[0] for r in raw], query=[qids[r[1]] for r in raw], targets=[r[2] for r in raw],
                        query_row=query_row)
    # Sources with weights other than 1 are mixed by weight; otherwise every example once an epoch.
    mixture = weights if any(src.weight != 1.0 for src, _ in per_source) else None
    if visual_tokens is not None:
        collator = Collator(examples, table, visual_tokens=visual_tokens, query_table=query_table, seed=cfg.train.seed)
    else:
        to_tensor, frames = pixel_loader(model), model.config.vision.num_frames
        collator = Collator(examples, table, query_table=query_table, seed=cfg.train.seed,
                            load_pixels=lambda j: visual_pixels(image_list[j], to_tensor, num_frames=frames))
    return TrainingData(examples, collator, image_list, text_list, report, hits, encode_seconds, mixture)


def _concat_text_features(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join per-chunk text features; flat token-state offsets are shifted to follow each other."""
    out = {"pooled": torch.cat([p["pooled"] for p in parts])}
    if "states" in parts[0]:
        out["states"] = torch.cat([p["states"] for p in parts])
        offsets, base = [parts[0]["offsets"][:1]], 0
        for p in parts:
            offsets.append(p["offsets"][1:] + base)
            base += int(p["offsets"][-1])
        out["offsets"] = torch.cat(offsets)
    return out


def _check_images(paths: list[str], num_frames: int, on_error: str, report: SkipReport) -> torch.Tensor:
    """Which images and clips can be read (the frames a clip gives to ``num_frames`` frames)."""
    ok = torch.zeros(len(paths), dtype=torch.bool)
    for i, p in enumerate(paths):
        if load_visual(p, num_frames=num_frames, on_error=on_error) is None:
            report.add(unreadable(p), p)
        else:
            ok[i] = True
    return ok


class MixtureSampler(torch.utils.data.Sampler[int]):
    """Draws an epoch's worth of example indices with replacement, by weight, from (seed, epoch),
    so every process draws the same sequence and a resumed run draws what it would have drawn."""

    def __init__(self, weights: list[float], *, seed: int) -> None:
        self.weights = torch.tensor(weights, dtype=torch.double)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.multinomial(self.weights, len(self.weights), replacement=True, generator=g).tolist()


def training_loader(data: TrainingData, cfg: RunConfig, *, per_process: int, pin_memory: bool = False) -> DataLoader:
    """Batches of ``per_process`` examples in an order drawn from ``train.seed`` (and the epoch) alone."""
    n = len(data.examples)
    if data.mixture is None:
        sampler = torch.utils.data.RandomSampler(ExampleIndex(n), generator=torch.Generator().manual_seed(cfg.train.seed))
    else:
        sampler = MixtureSampler(data.mixture, seed=cfg.train.seed)
    loader = DataLoader(ExampleIndex(n), batch_size=per_process, sampler=sampler, drop_last=True,
                        collate_fn=data.collator, num_workers=cfg.data.num_workers, pin_memory=pin_memory,
                        persistent_workers=cfg.data.num_workers > 0)
    if len(loader) == 0:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the {n} training examples")
    return loader
