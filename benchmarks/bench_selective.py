"""Selective decoding on long world streams, with the VL-JEPA paper's protocol.

Each stream (vljepa.data.world.stream) is minutes of video: scenes held 4-30 s, with a slow pan and
pixel noise inside a scene, and the current scene's captions as ground truth every second. The model
(a stage-1 quickstart caption model) embeds the stream query-free, one embedding per --stride
seconds. Three policies choose where to decode, each swept over its rate parameter:

  uniform   a fixed rate (decodes per second)
  ward      Ward-linkage agglomerative clustering of the finished stream (temporal connectivity),
            round(rate * duration) segments, each decoded at its middle embedding
  online    decode when the embedding moves more than a cosine-distance threshold from the last
            decoded one, or after --max-gap seconds

A decode is the nearest caption of a candidate bank (the world's training captions plus the
streams' scene captions). Every annotation is scored with CIDEr-D (vljepa.eval.caption.cider_d,
one corpus over all streams) against the text holding at its timestamp: for uniform and online the
most recent decode (empty before the first); for ward the text of the segment it falls in
(``ward``; ``ward_mean`` decodes each segment's mean embedding instead of its middle one), and,
strictly causal, the most recent decode counting a segment's text only from its middle
(``ward_from_midpoint``). The ratio of decodes at equal CIDEr interpolates each curve at the
CIDEr uniform reaches at 1 decode per second (the paper: 2.85x fewer decodes for Ward on EgoExo4D),
at the rate above which the curve stays at or above that CIDEr (and, as a second number, where it
first reaches it).

Also measured: captions/s of nearest-neighbour decoding at batch 1 and 64 (and of the model's text
decoder, if it has one), and frames/s of the stream embedding.

    python benchmarks/bench_selective.py --model runs/quickstart/stage1/model --world runs/quickstart/world
    python benchmarks/bench_selective.py            # trains a stage-1 model on a fresh world first
    python benchmarks/bench_selective.py --smoke --out /tmp/sel.json   # does it run? (tiny, meaningless)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vljepa.config import config_dir, load_config
from vljepa.data.readers import read_split
from vljepa.data.readers.video import iter_frames
from vljepa.data.world import generate_world
from vljepa.data.world.stream import generate_stream
from vljepa.decode.nearest import CandidateBank
from vljepa.decode.selective import Online, Uniform, Ward
from vljepa.decode.stream import embed_stream, model_decoder
from vljepa.embed import embed_texts
from vljepa.eval.caption import cider_d
from vljepa.models.vljepa import VLJepa
from vljepa.train.trainer import train

RESULTS = Path(__file__).parent / "results"
UNIFORM_RATES = [2.0, 1.0, 0.5, 1 / 3, 0.25, 0.2, 1 / 6, 0.125, 0.1, 1 / 15, 0.05, 1 / 30, 1 / 60]  # per second
WARD_PER_MIN = [0.5, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 45, 60, 90, 120]
ONLINE_THRESHOLDS = [0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]
REFERENCE_RATE = 1.0  # decodes per second of the uniform point that sets the CIDEr to match


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _train_model(work: Path, smoke: bool) -> tuple[Path, Path, float]:
    """A stage-1 quickstart caption model trained on a fresh world: (model dir, world dir, seconds)."""
    t = time.time()
    world = work / "world"
    sizes = dict(n_train=240, n_test=10, n_comp=10) if smoke else dict(n_train=8000, n_test=10, n_comp=10)
    generate_world(world, seed=0, **sizes)
    extra = (["train.max_steps=4", "train.batch_size=32", "optim.warmup_steps=1", "model.predictor.depth=1"]
             if smoke else [])
    cfg = load_config(config_dir() / "train" / "quickstart_stage1.yaml",
                      [f"data.train={world / 'train'}", f"data.cache_dir={work / 'cache'}",
                       f"train.output_dir={work / 'stage1'}", "train.progress=false", *extra])
    return train(cfg).model_dir, world, time.time() - t


def _curve_crossing(rates: list[float], ciders: list[float], target: float, *, stays: bool) -> float | None:
    """The rate at which the curve (sorted by rate) reaches ``target``, linearly interpolated between
    the two points around the crossing: the first crossing (``stays=False``), or the last one, above
    which every measured point is at or above ``target`` (``stays=True``). The lowest measured rate if
    it already reaches the target (the true crossing is at or below it); None if the curve never
    reaches it (or, with ``stays``, ends below it)."""
    order = np.argsort(rates)
    r, c = np.asarray(rates, dtype=float)[order], np.asarray(ciders, dtype=float)[order]
    below = np.flatnonzero(c < target - 1e-12)
    if len(below) == 0:
        return float(r[0])
    if stays:
        j = int(below[-1]) + 1
    else:
        above = np.flatnonzero(c >= target - 1e-12)
        j = int(above[0]) if len(above) else len(c)
    if j >= len(c):
        return None
    if j == 0:
        return float(r[0])
    frac = (target - c[j - 1]) / (c[j] - c[j - 1])
    return float(r[j - 1] + frac * (r[j] - r[j - 1]))


def _time_calls(fn, n: int, warmup: int = 3) -> float:
    """Median seconds of one call of ``fn`` over ``n`` calls (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a stage-1 caption model folder; default: train one first")
    parser.add_argument("--world", default="", help="the world the model was trained on (its train captions join "
                                                   "the bank, its held-out pairs stay out of the streams)")
    parser.add_argument("--streams", type=int, default=12)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds per stream")
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--stride", type=float, default=0.5, help="seconds between embeddings")
    parser.add_argument("--max-gap", type=float, default=30.0, help="online policy: longest gap between decodes")
    parser.add_argument("--bank-images", type=int, default=8000, help="train images whose captions join the bank")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    parser.add_argument("--out", default=str(RESULTS / "selective_decoding.json"))
    args = parser.parse_args()
    if args.smoke:
        args.streams, args.duration, args.bank_images = 1, 40.0, 50

    start = time.time()
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["python", *sys.argv]),
               "loadavg_start": list(os.getloadavg())}
    try:
        machine["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                               cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        machine["git_commit"] = None

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_s = None
        if args.model:
            model_dir, world = Path(args.model), Path(args.world) if args.world else None
        else:
            model_dir, world, train_s = _train_model(work, args.smoke)
        model = VLJepa.from_pretrained(model_dir).eval()
        summary_file = Path(model_dir).parent / "train_summary.json"  # written next to model/ by train()
        model_training = None
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
            model_training = {"steps": summary["steps"], "seconds": summary["seconds"],
                              "final_loss": summary["last"]["loss"], "final_batch_acc": summary["last"]["batch_acc"]}
        held_out = json.loads((world / "world.json").read_text())["held_out"] if world else []

        # Streams, their embeddings and ground truth.
        t = time.time()
        streams = []
        for i in range(args.streams):
            s = generate_stream(work / f"stream{i}", seed=1000 + i, duration_s=args.duration, fps=args.fps,
                                image_size=model.config.vision.image_size, exclude=[tuple(p) for p in held_out])
            streams.append(json.loads(s.annotations.read_text()) | {"path": s.video})
        generate_s = time.time() - t
        t = time.time()
        n_frames = 0
        for s in streams:
            steps = list(embed_stream(model, iter_frames(s["path"]), stride_s=args.stride, batch_size=32,
                                      source=str(s["path"])))
            s["times"] = np.array([st.time for st in steps])
            s["emb"] = torch.stack([st.embedding for st in steps])
            n_frames += s["frames"]
        embed_s = time.time() - t

        # The candidate bank, and the nearest caption of every embedding (a plan decodes a subset).
        texts = [c for s in streams for scene in s["scenes"] for c in scene["captions"]]
        if world is not None:
            records, _ = read_split(world / "train", "caption")
            texts += [c for r in records[: args.bank_images] for c in r.captions]
        t = time.time()
        bank = CandidateBank.build(texts, lambda x: embed_texts(model, x))
        bank_s = time.time() - t
        for s in streams:
            s["nearest"] = [row[0] for row in bank.decode(s["emb"], k=1)]

    references = [note["captions"] for s in streams for note in s["annotations"]]
    minutes = sum(s["duration_s"] for s in streams) / 60

    def score(plans: list, from_midpoint: bool = False, mean: bool = False) -> dict:
        """CIDEr of the plans' texts at the annotations; ``mean``: decode each segment's mean embedding."""
        hyps, decodes = [], 0
        for s, plan in zip(streams, plans):
            if mean:
                texts = [row[0] for row in bank.decode(plan.segment_means(s["emb"]), k=1)]
            else:
                texts = [s["nearest"][i] for i in plan.indices]
            starts = plan.times if from_midpoint else plan.starts
            times = np.array([note["time"] for note in s["annotations"]])
            rows = np.searchsorted(starts, times + 1e-9, side="right") - 1
            hyps += [texts[r] if r >= 0 else "" for r in rows.tolist()]
            decodes += len(plan)
        corpus, _ = cider_d(references, hyps)
        return {"decodes": decodes, "decodes_per_min": decodes / minutes, "cider": corpus}

    t = time.time()
    curves: dict[str, list[dict]] = {"uniform": [], "ward": [], "ward_mean": [], "ward_from_midpoint": [],
                                     "online": []}
    for rate in UNIFORM_RATES:
        plans = [Uniform(rate=rate).plan(s["emb"], s["times"]) for s in streams]
        curves["uniform"].append({"rate_per_s": rate, **score(plans)})
    for per_min in WARD_PER_MIN:
        plans = [Ward(rate=per_min / 60).plan(s["emb"], s["times"]) for s in streams]
        curves["ward"].append({"target_per_min": per_min, **score(plans)})
        curves["ward_mean"].append({"target_per_min": per_min, **score(plans, mean=True)})
        curves["ward_from_midpoint"].append({"target_per_min": per_min, **score(plans, from_midpoint=True)})
    for threshold in ONLINE_THRESHOLDS:
        plans = [Online(threshold=threshold, max_gap_s=args.max_gap).plan(s["emb"], s["times"]) for s in streams]
        curves["online"].append({"threshold": threshold, "max_gap_s": args.max_gap, **score(plans)})
    sweep_s = time.time() - t

    reference = next(p for p in curves["uniform"] if p["rate_per_s"] == REFERENCE_RATE)
    equal_cider = {"cider": reference["cider"], "uniform_decodes_per_min": reference["decodes_per_min"]}
    for name, points in curves.items():
        rates, ciders = [p["decodes_per_min"] for p in points], [p["cider"] for p in points]
        stays = _curve_crossing(rates, ciders, reference["cider"], stays=True)
        first = _curve_crossing(rates, ciders, reference["cider"], stays=False)
        equal_cider[name] = {
            "decodes_per_min": stays,
            "ratio_vs_uniform": None if stays is None else reference["decodes_per_min"] / stays,
            "first_reach_decodes_per_min": first,
            "first_reach_ratio_vs_uniform": None if first is None else reference["decodes_per_min"] / first,
            "lowest_measured_decodes_per_min": min(rates), "best_cider": max(ciders)}

    # Decoder throughput: nearest-neighbour search over the bank, batch 1 and 64.
    g = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(64, bank.dim, generator=g), dim=-1)
    throughput = {"bank_size": len(bank)}
    for batch, n in ((1, 20 if args.smoke else 200), (64, 5 if args.smoke else 50)):
        sec = _time_calls(lambda: bank.decode(queries[:batch], k=1), n)
        throughput[f"nearest_batch{batch}_captions_per_s"] = batch / sec
    decoder = model_decoder(model)
    if decoder is None:
        throughput["model_decoder"] = "absent (the model has no text decoder)"
    else:
        for batch in (1, 64):
            sec = _time_calls(lambda: decoder(queries[:batch]), 3 if args.smoke else 10, warmup=1)
            throughput[f"model_decoder_batch{batch}_captions_per_s"] = batch / sec

    machine["loadavg_end"] = list(os.getloadavg())
    result = {
        "benchmark": "selective decoding on world streams (VL-JEPA protocol)",
        "smoke": args.smoke,
        "machine": machine,
        "settings": {"model": str(args.model or "trained by this run (quickstart stage 1)"),
                     "model_training": model_training,
                     "world": str(world) if world else None, "streams": args.streams, "duration_s": args.duration,
                     "fps": args.fps, "stride_s": args.stride, "online_max_gap_s": args.max_gap,
                     "annotations": len(references), "embeddings": int(sum(len(s["times"]) for s in streams)),
                     "scenes": int(sum(len(s["scenes"]) for s in streams)), "bank_texts": len(bank),
                     "reference_uniform_rate_per_s": REFERENCE_RATE},
        "equal_cider": equal_cider,
        "curves": curves,
        "throughput": throughput,
        "seconds": {"train": train_s, "generate_streams": generate_s, "embed_streams": embed_s,
                    "embed_frames_per_s": n_frames / embed_s, "build_bank": bank_s, "sweep": sweep_s,
                    "total": time.time() - start},
    }
    out = Path(args.out)
    _write_atomic(out, (json.dumps(result, indent=2) + "\n").encode())
    _plot(curves, equal_cider, out.with_suffix(".png"))
    print(f"reference: uniform at {REFERENCE_RATE:g}/s = {reference['decodes_per_min']:.1f} decodes/min, "
          f"CIDEr {reference['cider']:.3f}")
    for name in curves:
        e = equal_cider[name]
        ratio = ("not reached" if e["ratio_vs_uniform"] is None else f"{e['ratio_vs_uniform']:.2f}x fewer decodes "
                 f"(first reached at {e['first_reach_ratio_vs_uniform']:.2f}x)")
        print(f"{name:>20}: best CIDEr {e['best_cider']:.3f}; at the reference CIDEr {ratio}")
    print(json.dumps(throughput, indent=2))
    print(f"written {out} and {out.with_suffix('.png')} in {time.time() - start:.0f}s")


def _plot(curves: dict, equal_cider: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"uniform": ("tab:gray", "o", "-"), "ward": ("tab:blue", "s", "-"), "ward_mean": ("tab:green", "D", "-"),
              "ward_from_midpoint": ("tab:blue", "s", ":"), "online": ("tab:orange", "^", "-")}
    for name, points in curves.items():
        pts = sorted(points, key=lambda p: p["decodes_per_min"])
        color, marker, line = styles[name]
        ax.plot([p["decodes_per_min"] for p in pts], [p["cider"] for p in pts], color=color, marker=marker,
                linestyle=line, markersize=4, label=name.replace("_", " "))
    ax.axhline(equal_cider["cider"], color="black", linewidth=0.8, linestyle="--",
               label="CIDEr of uniform at 1 decode/s")
    ax.set_xscale("log")
    ax.set_xlabel("decodes per minute")
    ax.set_ylabel("CIDEr-D")
    ax.set_title("Selective decoding on world streams")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    _write_atomic(path, buf.getvalue())


if __name__ == "__main__":
    main()
