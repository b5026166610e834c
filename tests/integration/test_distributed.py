"""Two CPU processes (gloo) train like one process with the same global batch; gradient caching
gives the full-batch gradients. Both compare real trainer set-ups (tests/integration/dist_grads.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vljepa.data.world import generate_world
from vljepa.quickstart import free_port

SCRIPT = Path(__file__).with_name("dist_grads.py")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(SCRIPT.parent))
from dist_grads import TINY as SCRIPT_TINY  # noqa: E402  the same tiny model as the gradient runs


def _run(args: list[str], nproc: int = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(SCRIPT), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def grads(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("dist")
    generate_world(root / "world", seed=1, n_train=40, n_test=4, n_comp=4, image_size=32)
    train = str(root / "world" / "train")
    runs = {
        "one": ([], 1),
        "two": ([], 2),
        "one_cached": (["--chunk", "4"], 1),
        "two_cached": (["--chunk", "3"], 2),
        "two_pixels": (["--vision-frozen", "false"], 2),
        "one_pixels": (["--vision-frozen", "false"], 1),
    }
    out = {}
    for name, (extra, nproc) in runs.items():
        target = root / f"{name}.safetensors"
        _run(["--train", train, "--run-dir", str(root / name), "--out", str(target), *extra], nproc)
        out[name] = load_file(str(target))
    return out


def _max_grad_diff(a: dict, b: dict) -> float:
    keys = [k for k in a if k.startswith("grad/")]
    assert keys and sorted(keys) == sorted(k for k in b if k.startswith("grad/"))
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


def test_two_processes_equal_one_process(grads):
    one, two = grads["one"], grads["two"]
    assert int(two["num_processes"]) == 2 and int(one["num_processes"]) == 1
    assert float((one["loss"] - two["loss"]).abs()) < 1e-5
    assert _max_grad_diff(one, two) < 1e-5
    # The gradients are not trivially zero: the comparison means something.
    assert max(float(v.abs().max()) for k, v in one.items() if k.startswith("grad/")) > 1e-2


def test_two_processes_equal_one_process_with_trainable_vision(grads):
    one, two = grads["one_pixels"], grads["two_pixels"]
    assert any(k.startswith("grad/vision.") for k in one)
    assert float((one["loss"] - two["loss"]).abs()) < 1e-5
    assert _max_grad_diff(one, two) < 1e-5


def test_gradient_caching_equals_full_batch(grads):
    assert float((grads["one"]["loss"] - grads["one_cached"]["loss"]).abs()) < 1e-5
    assert _max_grad_diff(grads["one"], grads["one_cached"]) < 1e-5


def test_gradient_caching_across_processes_equals_full_batch(grads):
    assert _max_grad_diff(grads["one"], grads["two_cached"]) < 1e-5


def test_two_process_cli_run_with_sharded_evaluation(tmp_path):
    """`vljepa train` under torchrun: trains, saves once, and its gathered evaluation equals a
    single-process evaluation of the saved model."""
    import json

    from vljepa.config import EvalConfig
    from vljepa.eval.report import evaluate
    from vljepa.models.vljepa import VLJepa

    generate_world(tmp_path / "world", seed=3, n_train=24, n_test=7, n_comp=4, image_size=32)
    out = tmp_path / "run"
    tiny = [a for a in SCRIPT_TINY if not a.startswith("data.task")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "vljepa.cli", "train", *tiny, f"data.train={tmp_path / 'world' / 'train'}", "data.task=mixed",
           f"train.output_dir={out}", "train.batch_size=8", "train.max_steps=3", "eval.batch_size=2",
           "--eval-split", str(tmp_path / "world" / "test")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    gathered = summary["eval"]
    model = VLJepa.from_pretrained(out / "model")
    single = evaluate(model, tmp_path / "world" / "test", EvalConfig(batch_size=2, tasks=["retrieval", "vqa"]))
    assert gathered["retrieval"]["n_images"] == single["retrieval"]["n_images"] == 7
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "i2t_mean_rank"):
        assert abs(gathered["retrieval"][key] - single["retrieval"][key]) < 1e-6, key
    assert gathered["vqa"]["n"] == single["vqa"]["n"]
    assert abs(gathered["vqa"]["accuracy"] - single["vqa"]["accuracy"]) < 1e-6


def test_shipped_cpu_2proc_config_starts_two_processes(tmp_path):
    """`accelerate launch --config_file cpu_2proc.yaml` must start two processes, not one (with
    `distributed_type: MULTI_CPU` or `use_cpu: true`, accelerate launch runs a single process)."""
    from vljepa.config import config_dir

    script = tmp_path / "who.py"
    # As the trainer builds it on a machine without CUDA (cpu=True).
    # Each rank writes its own file: the ranks share one stdout, so printed lines can interleave.
    script.write_text("import pathlib, sys\n"
                      "from accelerate import Accelerator\n"
                      "a = Accelerator(cpu=True)\n"
                      "pathlib.Path(sys.argv[1], f'rank{a.process_index}.txt').write_text(\n"
                      "    f'rank {a.process_index} of {a.num_processes} {a.distributed_type.value}')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()), str(script), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = sorted(p.read_text() for p in tmp_path.glob("rank*.txt"))
    assert lines == ["rank 0 of 2 MULTI_CPU", "rank 1 of 2 MULTI_CPU"]
