"""Training samples/s with 1 process vs N processes (torchrun / gloo on CPU, NCCL on GPUs).

Both runs train the quickstart model through the real CLI (`vljepa train`) on the same world and
the same global batch; samples/s is read from each run's metrics.jsonl, skipping the first logging
window (warm-up). Both numbers come from this one invocation, so their ratio is meaningful.

    python benchmarks/bench_distributed.py [--nproc 2] [--steps 60] [--out benchmarks/results/distributed_cpu.json]
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

import torch

from vljepa.quickstart import free_port

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run(nproc: int, world: Path, out: Path, steps: int, batch: int, precision: str, threads: int) -> dict:
    args = ["train", "--config", str(ROOT / "vljepa/configs/train/quickstart_stage2.yaml"),
            f"data.train={world / 'train'}", f"data.cache_dir={out.parent / 'cache'}", f"train.output_dir={out}",
            f"train.max_steps={steps}", f"train.batch_size={batch}", "train.log_every=10",
            f"train.precision={precision}", "train.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "vljepa.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "vljepa.cli", *args]
    t = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    rates = rates[1:] or rates  # the first window holds the warm-up
    return {"processes": nproc, "threads_per_process": threads, "samples_per_s": statistics.median(rates),
            "windows": len(rates), "wall_s": time.time() - t, "peak_memory_mb": rows[-1].get("peak_memory_mb")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=256, help="global batch (split over processes)")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/distributed_cpu.json"))
    args = parser.parse_args()

    from vljepa.data.world import generate_world

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        generate_world(world, seed=0, n_train=args.images, n_test=10, n_comp=10)
        # Warm the frozen-tower cache once so neither timed run pays for encoding.
        run(1, world, Path(tmp) / "warm", 1, args.batch, args.precision, cores)
        single = run(1, world, Path(tmp) / "one", args.steps, args.batch, args.precision, cores)
        multi = run(args.nproc, world, Path(tmp) / "many", args.steps, args.batch, args.precision,
                    max(1, cores // args.nproc))
    result = {
        "benchmark": "distributed",
        "machine": {"platform": platform.platform(), "cpu_model": _cpu_model(), "cpu_count": cores,
                    "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {"steps": args.steps, "global_batch": args.batch, "precision": args.precision,
                     "images": args.images, "config": "vljepa/configs/train/quickstart_stage2.yaml (mixed task)"},
        "one_process": single,
        f"{args.nproc}_processes": multi,
        "speedup": multi["samples_per_s"] / single["samples_per_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
