"""The quickstart end to end on its --small world, in one process and under `accelerate launch` with
two CPU processes: both write a loadable model, the resolved stage configs and metrics.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vljepa.config import ConfigError
from vljepa.models.vljepa import VLJepa
from vljepa.quickstart import default_processes, run_quickstart


def test_default_processes_one_per_gpu_one_on_a_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_processes() == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert default_processes() == 4


def test_negative_processes_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="--processes"):
        run_quickstart(tmp_path / "qs", small=True, processes=-1)


def test_small_quickstart_with_two_processes(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "vljepa.cli", "quickstart", "--small", "--processes", "2",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["small"]
    assert set(metrics["results"]) == {"test", "comp"} and set(metrics["results"]["test"]) >= {"retrieval", "vqa"}
    assert "VQA accuracy" in done.stdout and "reference" not in done.stdout  # --small: no reference column
    # Each stage ran under accelerate launch from its saved config, with two processes.
    for stage in ("stage1", "stage2"):
        assert (out / f"{stage}.yaml").is_file()
        summary = json.loads((out / stage / "train_summary.json").read_text())
        assert summary["steps"] == 6
    assert "processes 2" in done.stdout
    # Stage 2 started from stage 1 and its encoded towers came from the cache the quickstart wrote.
    assert "cache hits {'images': True" in done.stdout
    model = VLJepa.from_pretrained(out / "model")
    assert model.config.predictor.depth == 1


def test_reference_results_describe_the_shipped_configuration():
    """The reference the full quickstart prints beside its own numbers: a measured run of the shipped
    configs, with its machine and command, in the report format."""
    from vljepa.eval.report import format_table
    from vljepa.quickstart import reference_results

    ref = reference_results()
    assert ref is not None and {"machine", "command", "date", "seconds", "results"} <= set(ref)
    assert ref["command"].startswith("vljepa quickstart")
    table = format_table(ref["results"], ref["results"])
    assert "VQA accuracy" in table and "retrieval i2t" in table and " - " not in table
