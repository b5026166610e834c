"""A run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends; a failed
checkpoint write leaves the previous checkpoint loadable; a NaN loss is skipped or stops the run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vljepa import atomic
from vljepa.config import load_config
from vljepa.data.world import generate_world
from vljepa.train import trainer

TINY = [
    "model.vision.kind=vit", "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.dim=32",
    "model.vision.depth=1", "model.vision.heads=2", "model.predictor.dim=32", "model.predictor.depth=1",
    "model.predictor.heads=2", "model.embed_dim=16", "train.precision=no", "train.progress=false",
    "train.batch_size=8", "train.log_every=1", "optim.warmup_steps=2", "data.task=mixed",
]
STEPS = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft") / "world"
    generate_world(root, seed=2, n_train=24, n_test=4, n_comp=4, image_size=32)
    return root


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "vljepa.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_args(world: Path, out: Path) -> list[str]:
    return ["train", *TINY, f"data.train={world / 'train'}", f"train.output_dir={out}",
            f"train.max_steps={STEPS}", "train.save_every=1", "train.keep_last=3"]


def _last_metrics(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("step") == STEPS][-1]


def test_sigkill_then_resume_matches_uninterrupted_run(world, tmp_path):
    full = tmp_path / "full"
    done = _cli(_train_args(world, full))
    assert done.wait(timeout=300) == 0, done.stderr.read()[-2000:]

    killed = tmp_path / "killed"
    kill_after = random.Random().randint(2, STEPS - 3)
    proc = _cli(_train_args(world, killed))
    target = killed / "checkpoints" / f"step_{kill_after:08d}"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed (step {kill_after})"
    assert not (killed / "model").exists()

    resumed = _cli(_train_args(world, killed) + ["--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert "resumed from" in resumed.stdout.read()

    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ after resuming from step {kill_after}"
    ma, mb = _last_metrics(full), _last_metrics(killed)
    assert ma["loss"] == mb["loss"] and ma["batch_acc"] == mb["batch_acc"]
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert kept == [f"step_{s:08d}" for s in range(STEPS - 2, STEPS + 1)]  # keep_last=3, no temp folders


def test_failed_checkpoint_write_keeps_previous(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(None, TINY + [f"data.train={world / 'train'}", f"train.output_dir={out}",
                                    "train.max_steps=4", "train.save_every=1"])
    real_fsync = atomic.fsync_tree
    def failing_fsync(folder: Path) -> None:
        real_fsync(folder)
        if Path(folder).name == ".tmp_step_00000003":  # the third checkpoint's files are written, then the disk "fills up"
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "fsync_tree", failing_fsync)
    with pytest.raises(trainer.CheckpointError, match=r"step_00000003.*No space left.*step_00000002 is intact"):
        trainer.train(cfg)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000001", "step_00000002"]  # no half-written folder left behind
    # A write killed half-way leaves a temporary folder; it is never mistaken for a checkpoint.
    (out / "checkpoints" / ".tmp_step_00000003").mkdir()
    monkeypatch.setattr(atomic, "fsync_tree", real_fsync)
    result = trainer.train(cfg, resume=True)
    assert result.steps == 4
    assert (out / "model" / "model.safetensors").is_file()


def test_nan_loss_skip_or_stop(world, tmp_path, monkeypatch):
    real = trainer.forward_backward
    calls = {"n": 0}

    def nan_on_second(run, batch, cfg):
        calls["n"] += 1
        loss, finite, metrics = real(run, batch, cfg)
        if calls["n"] == 2:
            nan = torch.tensor(float("nan"))
            return nan, torch.isfinite(nan), metrics
        return loss, finite, metrics

    monkeypatch.setattr(trainer, "forward_backward", nan_on_second)
    base = TINY + [f"data.train={world / 'train'}", "train.max_steps=3"]
    result = trainer.train(load_config(None, base + [f"train.output_dir={tmp_path / 'skip'}", "train.on_nan=skip"]))
    summary = json.loads((tmp_path / "skip" / "train_summary.json").read_text())
    assert result.steps == 3 and summary["nan_skipped"] == 1
    calls["n"] = 0
    with pytest.raises(FloatingPointError, match="train.on_nan=skip"):
        trainer.train(load_config(None, base + [f"train.output_dir={tmp_path / 'stop'}", "train.on_nan=stop"]))


def test_resume_from_a_checkpoint_that_holds_a_pickle_is_refused_with_a_clear_error(world, tmp_path, capsys):
    """A checkpoint file holding a pickled object (not ours, or tampered with) is not loaded: the CLI
    exits 2 naming the checkpoint and what to do, never advising weights_only=False."""
    from vljepa.cli import main

    out = tmp_path / "run"
    args = ["train", *TINY, f"data.train={world / 'train'}", f"train.output_dir={out}", "train.max_steps=2",
            "train.save_every=1"]
    assert main(args) == 0
    last = sorted((out / "checkpoints").iterdir())[-1]
    bins = sorted(last.glob("*.bin"))
    assert bins, f"no .bin file in {last}"
    torch.save({"state": Path("an arbitrary object")}, bins[0])  # a pickle that weights_only refuses
    capsys.readouterr()
    assert main([*args[:-2], "train.max_steps=3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint '{last}' cannot be loaded safely" in err and "Delete" in err
    assert "weights_only=False" not in err.replace("it is not loaded with weights_only=False", "")
    assert "Traceback" not in err
