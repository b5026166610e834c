"""One epoch of the quickstart model with and without the frozen-tower cache, in one run.

Three training runs through `vljepa.train.trainer.train`, same seed and data order, fp32:
  no_cache   data.cache=false: the frozen X (EfficientNet-Lite0) and Y (MiniLM) run in every step;
  cold       data.cache=true on an empty cache: towers encoded once, then the epoch;
  warm       data.cache=true again: the cache is read from disk, then the epoch.
Epoch time is the sum of the per-step times the trainer logs (log_every=1). Losses are compared
step by step between no_cache and warm.

    python benchmarks/bench_cache.py [--images 2000] [--out benchmarks/results/cache_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from vljepa.config import config_dir, load_config
from vljepa.data.world import generate_world
from vljepa.train.trainer import train


def _run(world: Path, out: Path, cache_dir: Path, cache: bool, steps: int, batch: int) -> dict:
    cfg = load_config(config_dir() / "train" / "quickstart_stage1.yaml", [
        f"data.train={world / 'train'}", f"data.cache={str(cache).lower()}", f"data.cache_dir={cache_dir}",
        f"train.output_dir={out}", f"train.max_steps={steps}", f"train.batch_size={batch}", "train.log_every=1",
        "train.precision=no", "train.progress=false", "optim.warmup_steps=2"])
    t = time.time()
    result = train(cfg)
    wall = time.time() - t
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    summary = json.loads((out / "train_summary.json").read_text())
    return {"losses": [r["loss"] for r in rows], "epoch_s": sum(batch / r["samples_per_s"] for r in rows),
            "encode_s": summary["encode_seconds"], "cache_hits": summary["cache_hits"], "wall_s": wall,
            "steps": result.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache_cpu.json"))
    args = parser.parse_args()
    steps = args.images // args.batch  # one epoch of the caption task (one example per image)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_world(root / "world", seed=0, n_train=args.images, n_test=10, n_comp=10)
        no_cache = _run(root / "world", root / "a", root / "cache", False, steps, args.batch)
        cold = _run(root / "world", root / "b", root / "cache", True, steps, args.batch)
        warm = _run(root / "world", root / "c", root / "cache", True, steps, args.batch)
    diff = max(abs(a - b) for a, b in zip(no_cache["losses"], warm["losses"]))
    result = {
        "benchmark": "frozen-tower cache, one epoch of the quickstart model (stage 1, fp32)",
        "machine": {"platform": platform.platform(), "cpu_count": torch.get_num_threads(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "command": " ".join(["python", *sys.argv]),
        "settings": {"images": args.images, "batch": args.batch, "steps": steps},
        "no_cache": no_cache, "cold_cache": cold, "warm_cache": warm,
        "epoch_speedup_warm": no_cache["epoch_s"] / warm["epoch_s"],
        "epoch_speedup_cold_including_encode": no_cache["epoch_s"] / (cold["epoch_s"] + cold["encode_s"]),
        "max_abs_loss_diff_no_cache_vs_warm": diff,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict) or k in ("settings",)}, indent=2))


if __name__ == "__main__":
    main()
