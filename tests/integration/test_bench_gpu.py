"""benchmarks/bench_gpu.py: the --tiny run on the CPU writes every documented key with sane values,
and its analytic FLOP count of the paper-size predictor matches Llama-3.2-1B's architecture."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from vljepa.config import RunConfig, config_dir, load_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_gpu.py"
CONFIG_KEYS = {"batch", "tokens_per_sample", "flops_per_step", "flop_formula", "step_ms_median", "samples_per_s",
               "tokens_per_s", "mfu", "peak_memory_gib", "infer_ms_b1", "infer_ms_b64", "matmul_params",
               "trainable_params", "forward_flops_per_sample"}


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_key(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"device", "torch", "dtype", "peak_flops", "configs", "notes"} <= set(results)
    assert results["tiny"] is True and results["notes"]
    cuda = results["device"] != "cpu"
    assert set(results["configs"]) == {"quickstart", "paper"}
    for name, r in results["configs"].items():
        assert CONFIG_KEYS <= set(r), (name, CONFIG_KEYS - set(r))
        assert r["batch"] > 0 and r["tokens_per_sample"] > 0 and r["flops_per_step"] > 0 and r["flop_formula"]
        assert r["flops_per_step"] == 3 * r["batch"] * r["forward_flops_per_sample"]
        assert r["step_ms_median"] > 0 and r["samples_per_s"] > 0 and r["infer_ms_b1"] > 0 and r["infer_ms_b64"] > 0
        assert math.isclose(r["tokens_per_s"], r["samples_per_s"] * r["tokens_per_sample"])
        assert math.isfinite(r["loss_last"])
        if cuda:
            assert 0 < r["mfu"] < 1 and r["peak_memory_gib"] > 0
        else:
            assert r["mfu"] is None and r["peak_memory_gib"] is None
        # The analytic count covers the trainable matmuls: what is left is biases, norms and position tables.
        assert 0.9 * r["trainable_params"] <= r["matmul_params"] <= r["trainable_params"], name
    # The quickstart's tokens: 4 x 4 EfficientNet-Lite0 cells + the query.
    qs = results["configs"]["quickstart"]
    assert qs["tokens_per_sample"] == 16 + qs["shapes"]["query_len"]
    # The table comes last, one row per configuration; only the line naming the JSON file follows.
    tail = [line for line in done.stdout.splitlines() if line.strip()][-4:]
    assert [line.split()[0] for line in tail] == ["config", "quickstart", "paper", "[bench]"], tail


def test_paper_flops_match_llama_3_2_1b():
    bench = load_script()
    cfg = load_config(REPO / "configs" / "paper" / "model.yaml", cls=RunConfig).model
    arch = json.loads((bench.LLAMA / "config.json").read_text())
    shapes = {"visual_tokens": 256, "visual_dim": 1024, "query_len": 32, "target_pooled": 768, "llama": arch}
    flops = bench.count_flops(bench.paper_flops(cfg, shapes), batch=128)
    layer = flops["flop_terms"]["stacks"]["llama_layers"]
    # Llama-3.2-1B has 1,235,814,400 parameters: 16 such layers, the 128256 x 2048 embedding and the RMSNorm weights.
    assert 16 * layer["P_layer"] + 128256 * 2048 + (2 * 16 + 1) * 2048 == 1_235_814_400
    assert layer["layers"] == 8 and layer["S"] == 288
    # Per token about 2 x the 8 layers' matmul parameters forward; x 3 with the backward.
    per_token = flops["flops_per_step"] / (128 * 288)
    assert 6 * 8 * layer["P_layer"] < per_token < 6.2 * 8 * layer["P_layer"]
