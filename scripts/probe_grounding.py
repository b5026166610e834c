"""Where a VQA model loses a named object: probes of X's tokens, of the predictor's readout, and
the question words' attention over the image.

    python scripts/probe_grounding.py --model RUN/model --data data/grounded_vqa --out RUN/probe

``--data`` holds ``train/`` and ``test/`` splits written by ``scripts/make_grounded_vqa.py``
(records carry the image's ``objects``: colour, shape, centre ``x``, ``y``, radius ``r``). Probes are
fitted on ``train`` and scored on ``test``:

- ``x_tokens``: logistic regression on the flattened frozen X tokens of an image; per colour, is
  that colour's object left or right of the middle (``side_x``) / above or below (``side_y``); per
  ordered pair of colours, is the first left of the second (``pair_x``) / above it (``pair_y``).
- ``readout``: on the predictor's pooled state (the input of its linear head) for the relation
  questions: the yes/no answer (linear and MLP probes), the ordering of the two named objects on
  the question's axis regardless of the relation word (``order``), and the relation word itself.
- ``attention``: for position questions, the share of each predictor layer's attention (mean over
  heads) from the colour word's tokens to the visual tokens whose cells the named object covers,
  against the share those cells are of the grid (what uniform attention gives).

Writes ``probe.json`` and ``attention.png`` (a few test images with the colour word's attention in
the layer that looks at the named object most and in the last layer) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vljepa.embed import encode_images
from vljepa.models.vljepa import VLJepa

SIDE_MARGIN = 0.12
PAIR_MARGIN = 0.15
RELATION_AXIS = {"left of": ("x", +1), "right of": ("x", -1), "above": ("y", +1), "below": ("y", -1)}


def read_records(split: Path) -> list[dict]:
    with (split / "metadata.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def image_tokens(model: VLJepa, split: Path, records: list[dict]) -> tuple[list[str], torch.Tensor]:
    files = sorted({r["file_name"] for r in records})
    tokens, ok = encode_images(model, [str(split / f) for f in files], batch_size=64)
    if not bool(ok.all()):
        raise SystemExit(f"{int((~ok).sum())} images of {split} could not be read")
    return files, tokens


def fit_score(xtr, ytr, xte, yte, *, mlp: bool = False) -> float | None:
    """Held-out accuracy of a probe; None when a side has one class only or too few rows."""
    if len(set(ytr)) < 2 or len(set(yte)) < 2 or len(ytr) < 20:
        return None
    clf = MLPClassifier((256,), max_iter=400, random_state=0) if mlp else LogisticRegression(C=0.1, max_iter=2000)
    probe = make_pipeline(StandardScaler(), clf)
    probe.fit(xtr, ytr)
    return float(probe.score(xte, yte))


def scene_labels(objects: list[dict]) -> dict[str, int]:
    """The probe targets an image's objects define: side per colour, order per ordered colour pair."""
    out = {}
    for o in objects:
        for axis in ("x", "y"):
            if abs(o[axis] - 0.5) >= SIDE_MARGIN:
                out[f"side_{axis}:{o['color']}"] = int(o[axis] < 0.5)
        for p in objects:
            for axis in ("x", "y"):
                if o is not p and abs(o[axis] - p[axis]) >= PAIR_MARGIN:
                    out[f"pair_{axis}:{o['color']}>{p['color']}"] = int(o[axis] < p[axis])
    return out


def probe_x_tokens(train: tuple, test: tuple) -> dict:
    """Linear probes of each side / pair target from the flattened X tokens."""
    feats, labels = {}, {}
    for name, (records, files, tokens) in (("train", train), ("test", test)):
        row = {f: i for i, f in enumerate(files)}
        per_target = defaultdict(lambda: ([], []))
        for f, objects in {r["file_name"]: r["objects"] for r in records}.items():
            for target, y in scene_labels(objects).items():
                per_target[target][0].append(row[f])
                per_target[target][1].append(y)
        feats[name], labels[name] = tokens.flatten(1).numpy(), per_target
    scores = defaultdict(list)
    for target, (rows, ys) in labels["train"].items():
        if target not in labels["test"]:
            continue
        te_rows, te_ys = labels["test"][target]
        s = fit_score(feats["train"][rows], ys, feats["test"][te_rows], te_ys)
        if s is not None:
            scores[target.split(":")[0]].append(s)
    return {k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "probes": len(v)} for k, v in sorted(scores.items())}


class Recorder:
    """Forward hooks on the predictor: its head's input (the pooled state) and every block's qkv."""

    def __init__(self, predictor: torch.nn.Module) -> None:
        self.pooled: list[torch.Tensor] = []
        self.qkv: list[torch.Tensor] = []
        self.heads = predictor.blocks[0].heads
        predictor.head.register_forward_pre_hook(lambda m, args: self.pooled.append(args[0].detach().float()))
        for block in predictor.blocks:
            block.qkv.register_forward_hook(lambda m, args, out: self.qkv.append(out.detach().float()))

    def attention(self, key_mask: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights ``[B, heads, N, N]`` of each block of the last forward pass."""
        out = []
        for qkv in self.qkv:
            b, n, three_d = qkv.shape
            q, k, _ = qkv.view(b, n, 3, self.heads, three_d // (3 * self.heads)).permute(2, 0, 3, 1, 4)
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            out.append(logits.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(-1))
        return out


@torch.no_grad()
def run_predictor(model: VLJepa, rec: Recorder, tokens: torch.Tensor, questions: list[str], batch: int = 128):
    """Pooled states ``[M, dim]`` and per-question (query ids, last qkv attention) for position questions."""
    pooled = []
    for s in range(0, len(questions), batch):
        rec.pooled.clear()
        q = model.tokenize_queries(questions[s : s + batch])
        model.predictor(tokens[s : s + batch], q["query_ids"], q["query_mask"],
                        model.query_states(q["query_ids"], q["query_mask"]))
        pooled.append(rec.pooled[-1])
    return torch.cat(pooled).numpy()


def relation_targets(record: dict) -> tuple[int, int, int] | None:
    """(answer yes, first-named before second on the axis, relation word index) of a relation question."""
    q = record["question"]
    for word, (axis, _) in RELATION_AXIS.items():
        if f" {word} the " in q:
            a_name, b_name = q[len("is the "):].split(f" {word} the ")
            b_name = b_name.rstrip("?")
            by_name = {f"{o['color']} {o['shape']}": o for o in record["objects"]}
            a, b = by_name[a_name], by_name[b_name]
            return int(record["answer"] == "yes"), int(a[axis] < b[axis]), list(RELATION_AXIS).index(word)
    return None


def probe_readout(model: VLJepa, rec: Recorder, data: dict) -> dict:
    feats, targets = {}, {}
    for name, (records, files, tokens) in data.items():
        rel = [(r, t) for r in records if r["type"] == "relation" and (t := relation_targets(r)) is not None]
        row = {f: i for i, f in enumerate(files)}
        vis = tokens[[row[r["file_name"]] for r, _ in rel]]
        feats[name] = run_predictor(model, rec, vis, [r["question"] for r, _ in rel])
        targets[name] = np.array([t for _, t in rel])
    out = {"n_train": int(len(targets["train"])), "n_test": int(len(targets["test"]))}
    for col, what in enumerate(("answer", "order", "relation_word")):
        out[what] = fit_score(feats["train"], targets["train"][:, col], feats["test"], targets["test"][:, col])
    out["answer_mlp"] = fit_score(feats["train"], targets["train"][:, 0], feats["test"], targets["test"][:, 0], mlp=True)
    # The answer is the order XOR the relation's direction: check that the targets say so.
    sign = np.array([RELATION_AXIS[list(RELATION_AXIS)[w]][1] for w in targets["test"][:, 2]])
    out["answer_is_order_times_direction"] = float(np.mean(
        (targets["test"][:, 0] == 1) == ((targets["test"][:, 1] == 1) == (sign == 1))))
    return out


def word_token_positions(model: VLJepa, question: str, word: str) -> list[int]:
    """Indices (in the query) of the tokens that spell ``word`` in ``question``."""
    tok = model.text.tokenizer(question, return_offsets_mapping=True, truncation=True,
                               max_length=model.config.predictor.max_query_len)
    start = question.index(word)
    end = start + len(word)
    return [i for i, (a, b) in enumerate(tok["offset_mapping"]) if a < end and b > start and b > a]


def cells_covered(obj: dict, grid: int) -> np.ndarray:
    """Boolean ``[grid * grid]`` (raster order) of the cells whose centre lies within the object's radius."""
    centres = (np.arange(grid) + 0.5) / grid
    cx, cy = np.meshgrid(centres, centres)
    return (np.hypot(cx - obj["x"], cy - obj["y"]) <= max(obj["r"], 0.5 / grid)).ravel()


@torch.no_grad()
def probe_attention(model: VLJepa, rec: Recorder, records: list[dict], files: list[str], tokens: torch.Tensor,
                    limit: int = 400) -> tuple[dict, list]:
    row = {f: i for i, f in enumerate(files)}
    n_vis = tokens.shape[1]
    grid = int(round(math.sqrt(n_vis)))
    shares = defaultdict(list)
    uniform = []
    examples = []
    pos = [r for r in records if r["type"] == "position"][:limit]
    for r in pos:
        obj = next(o for o in r["objects"] if f" {o['color']} " in r["question"])
        color = obj["color"]
        q = model.tokenize_queries([r["question"]])
        words = word_token_positions(model, r["question"], color)
        rec.qkv.clear()
        model.predictor(tokens[[row[r["file_name"]]]], q["query_ids"], q["query_mask"],
                        model.query_states(q["query_ids"], q["query_mask"]))
        key_mask = torch.cat([torch.ones(1, n_vis, dtype=torch.bool), q["query_mask"].bool()], 1)
        cover = torch.from_numpy(cells_covered(obj, grid))
        uniform.append(float(cover.float().mean()))
        maps = rec.attention(key_mask)
        for layer, att in enumerate(maps):
            a = att[0].mean(0)[[n_vis + w for w in words], :n_vis].mean(0)  # [n_vis]
            shares[layer].append(float(a[cover].sum() / a.sum()))
        if len(examples) < 6:
            examples.append((r, [m[0].mean(0)[[n_vis + w for w in words], :n_vis].mean(0).view(grid, grid)
                                 for m in maps]))
    result = {"n": len(pos), "uniform_share": float(np.mean(uniform)),
              "share_on_named_object": {f"layer{k}": float(np.mean(v)) for k, v in sorted(shares.items())}}
    best = max(shares, key=lambda k: np.mean(shares[k]))
    return result, [(r, layer, maps[layer]) for r, maps in examples for layer in (best, len(maps) - 1)]


def plot_attention(examples: list, split: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    cols = len(examples) // 2
    fig, axes = plt.subplots(3, cols, figsize=(2.4 * cols, 7.6), squeeze=False)
    for col in range(cols):
        (r, first, amap), (_, last, last_map) = examples[2 * col], examples[2 * col + 1]
        img = Image.open(split / r["file_name"]).convert("RGB")
        axes[0, col].imshow(img)
        axes[0, col].set_title(r["question"].split(",")[0].replace(" closer to", "\ncloser to"), fontsize=7)
        for row, (layer, m) in ((1, (first, amap)), (2, (last, last_map))):
            axes[row, col].imshow(img)
            axes[row, col].imshow(m.numpy(), cmap="magma", alpha=0.6, extent=(0, img.width, img.height, 0))
            axes[row, col].set_title(f"colour word, layer {layer}", fontsize=7)
        for ax in axes[:, col]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a saved model folder")
    p.add_argument("--data", required=True, help="folder with train/ and test/ from make_grounded_vqa.py")
    p.add_argument("--out", required=True, help="folder for probe.json and attention.png")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = VLJepa.from_pretrained(args.model).eval()
    data = {}
    for name in ("train", "test"):
        split = Path(args.data) / name
        records = read_records(split)
        files, tokens = image_tokens(model, split, records)
        data[name] = (records, files, tokens)
        print(f"{name}: {len(files)} images, {len(records)} questions, X tokens {tuple(tokens.shape[1:])}")
    rec = Recorder(model.predictor)
    report = {"model": args.model, "x_tokens": probe_x_tokens(data["train"], data["test"])}
    print("x_tokens", report["x_tokens"])
    report["readout"] = probe_readout(model, rec, data)
    print("readout", report["readout"])
    report["attention"], examples = probe_attention(model, rec, *data["test"])
    print("attention", report["attention"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(report, indent=2))
    plot_attention(examples, Path(args.data) / "test", out / "attention.png")
    print(f"wrote {out / 'probe.json'} and {out / 'attention.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
