"""The quickstart: world -> stage 1 (captions) -> stage 2 (VQA + captions) -> evaluation.

It runs the same code a user's own run does: the world is written in the on-disk format, both
stages are ``train(cfg)`` with the shipped YAML configs, and evaluation reads the held-out splits
through the same readers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from vljepa.config import ConfigError, EvalConfig, RunConfig, config_dir, load_config, save_config, to_dict
from vljepa.data.world import generate_world
from vljepa.eval.report import evaluate, format_table
from vljepa.models.vljepa import VLJepa
from vljepa.train.trainer import cache_frozen_towers, train, with_resolved_precision

FULL = {"n_train": 8000, "n_test": 1000, "n_comp": 500}
SMALL = {"n_train": 240, "n_test": 60, "n_comp": 40}
SMALL_OVERRIDES = ["train.batch_size=32", "train.max_steps=6", "train.log_every=2", "optim.warmup_steps=2",
                   "model.predictor.depth=1"]

# The shipped configuration's results, measured with `vljepa quickstart` (machine and command inside).
REFERENCE = config_dir() / "reference" / "quickstart.json"


def reference_results() -> dict | None:
    """The reference run of the shipped quickstart configuration: machine, command, results, seconds."""
    return json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else None


def _world(root: Path, sizes: dict[str, int], seed: int, grounded: bool = False) -> Path:
    """Reuse a world written earlier with the same sizes, seed and question families; otherwise
    generate it."""
    meta = root / "world.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        wanted = {"train": sizes["n_train"], "test": sizes["n_test"], "comp": sizes["n_comp"]}
        if info.get("seed") == seed and info.get("splits") == wanted and bool(info.get("grounded")) == grounded:
            print(f"[quickstart] reusing the world in {root}", flush=True)
            return root
    print(f"[quickstart] generating the world in {root}", flush=True)
    generate_world(root, seed=seed, grounded=grounded, **sizes)
    return root


def default_processes() -> int:
    """Training processes the quickstart launches: one per GPU; one on a CPU, where a second process
    would share the same cores and add an all-reduce of the gradients to every step."""
    if torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a distributed launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_stage(cfg: RunConfig, processes: int) -> Path:
    """Train one stage, in this process or under ``accelerate launch``; returns its model folder."""
    if processes <= 1:
        return train(cfg).model_dir
    cfg = with_resolved_precision(cfg)
    out = Path(cfg.train.output_dir)
    # Frozen towers are encoded here, with every core, into the cache the launched processes read.
    cache_frozen_towers(cfg)
    config_file = save_config(cfg, out.with_name(out.name + ".yaml"))
    # --multi_gpu is accelerate launch's multi-process launcher; without GPUs it starts CPU processes
    # (gloo). Its --cpu flag would start a single process.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", cfg.train.precision, "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "vljepa.cli", "train", "--config", str(config_file)]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    sys.stdout.flush()  # what this process printed comes before the launched processes' output
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"training stage '{out}' failed under accelerate launch (exit code {done.returncode}); "
                           f"its config is {config_file}. Rerun with --processes 1 to train in this process.")
    return out / "model"


def run_quickstart(out: str | Path, *, small: bool = False, overrides: list[str] | None = None, seed: int = 0,
                   processes: int = 0, grounded: bool = False) -> dict:
    """Run the whole quickstart under ``out``; returns (and writes to ``out/metrics.json``) the metrics.

    ``grounded``: the world also asks the grounded question families (position, attribute, nearest /
    furthest, shared attributes and yes/no relations of named objects); the reference results are
    for the default world, so none are printed beside them.

    ``processes``: training processes per stage (0 = :func:`default_processes`); with more than one,
    each stage runs under ``accelerate launch`` with the same global batch.
    """
    if processes < 0:
        raise ConfigError(f"--processes {processes}: give 0 (automatic) or a positive number of processes")
    processes = processes or default_processes()
    out = Path(out)
    start = time.time()
    timings: dict[str, float] = {}
    world = _world(out / "world", SMALL if small else FULL, seed, grounded)
    timings["world"] = time.time() - start
    extra = (SMALL_OVERRIDES if small else []) + list(overrides or [])
    common = [f"data.train={world / 'train'}", f"data.cache_dir={out / 'cache'}", f"train.seed={seed}"]

    t = time.time()
    stage1 = load_config(config_dir() / "train" / "quickstart_stage1.yaml",
                         common + [f"train.output_dir={out / 'stage1'}"] + extra)
    print("[quickstart] stage 1: query-free caption pretraining", flush=True)
    stage1_model = _train_stage(stage1, processes)
    timings["stage1"] = time.time() - t

    t = time.time()
    train_split = world / "train"
    # Captions keep retrieval from fading; extra sources of the yes/no and relation questions give the
    # skills the predictor learns last more of the updates.
    relations = "[relation, relation_yesno]" if grounded else "[relation]"
    mixture = (f"data.sources=[{{path: '{train_split}', task: caption, weight: 1}}, "
               f"{{path: '{train_split}', task: vqa, weight: 2}}, "
               f"{{path: '{train_split}', task: vqa, types: [exist, yesno], weight: 1}}, "
               f"{{path: '{train_split}', task: vqa, types: {relations}, weight: 1}}]")
    stage2 = load_config(config_dir() / "train" / "quickstart_stage2.yaml",
                         [c for c in common if not c.startswith("data.train=")]
                         + [mixture, f"train.output_dir={out / 'stage2'}", f"train.init_from={stage1_model}"] + extra)
    print("[quickstart] stage 2: VQA fine-tuning (mixed with captions)", flush=True)
    stage2_model = _train_stage(stage2, processes)
    timings["stage2"] = time.time() - t

    t = time.time()
    model = VLJepa.from_pretrained(stage2_model)
    precision = stage2.train.precision
    classes = json.loads((world / "world.json").read_text())["classes"]  # all 24 colour-shape pairs
    results = {
        "test": evaluate(model, world / "test", EvalConfig(tasks=["retrieval", "classify", "vqa"], max_images=1000,
                                                           precision=precision, classnames=classes)),
        "comp": evaluate(model, world / "comp", EvalConfig(tasks=["classify", "vqa"], precision=precision,
                                                           classnames=classes)),
    }
    timings["eval"] = time.time() - t
    model_dir = model.save_pretrained(out / "model")
    timings["total"] = time.time() - start
    reference = None if small or grounded else reference_results()
    metrics = {"results": results, "timings_s": timings, "small": small, "grounded": grounded,
               "processes": processes,
               "stage1": to_dict(stage1), "stage2": to_dict(stage2)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print()
    print(format_table(results, reference["results"] if reference else None))
    if reference:
        print(f"\nreference: {reference['command']} on {reference['machine']} ({reference['seconds']:.0f} s)")
    print(f"\n[quickstart] done in {timings['total']:.0f}s: model in {model_dir}, metrics in {out / 'metrics.json'}")
    return metrics
