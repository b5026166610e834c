"""Operations: dry run, TensorBoard logging, and bf16 / fp32 parity of a training step."""

from __future__ import annotations

import json

import torch

from vljepa.cli import main
from vljepa.config import load_config
from vljepa.train.trainer import forward_backward, prepare_run


def test_dry_run_checks_data_and_prints_the_global_batch(tiny_world, make_tiny_overrides, tmp_path, capsys):
    out = tmp_path / "dry"
    code = main(["train", "--dry-run", *make_tiny_overrides("token"), f"data.train={tiny_world.root / 'train'}",
                 "data.task=mixed", "train.batch_size=8", "train.grad_accum=2", f"train.output_dir={out}"])
    text = capsys.readouterr().out
    assert code == 0
    info = json.loads(text[: text.rindex("}") + 1])
    assert info["global_batch"] == 16
    assert sum(info["records"].values()) > 48  # captions of 48 images + their questions
    assert info["parameters"]["predictor"]["trainable"] > 0
    assert "dry run ok" in text
    assert not (out / "model").exists()  # nothing trained, nothing written


def test_dry_run_reports_a_missing_split(tmp_path, make_tiny_overrides, capsys):
    code = main(["train", "--dry-run", *make_tiny_overrides("token"), f"data.train={tmp_path / 'nope'}"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_tensorboard_logging(tiny_world, make_tiny_overrides, tmp_path):
    out = tmp_path / "tb"
    code = main(["train", *make_tiny_overrides("token"), f"data.train={tiny_world.root / 'train'}",
                 "train.batch_size=8", "train.max_steps=2", "train.log_every=1", "train.log_with=[tensorboard]",
                 f"train.output_dir={out}"])
    assert code == 0
    events = list(out.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["samples_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in rows)


def test_bf16_step_matches_fp32(tiny_world, make_tiny_overrides, tmp_path):
    """The same batch under bf16 autocast and in fp32: close losses and gradients (a parity check)."""
    from accelerate.state import AcceleratorState

    results = {}
    for precision in ("no", "bf16"):
        # Accelerate keeps one precision per process; a new one needs a fresh state (as its own tests do).
        AcceleratorState._reset_state()
        cfg = load_config(None, [*make_tiny_overrides("token"), f"data.train={tiny_world.root / 'train'}",
                                 "train.batch_size=8", f"train.precision={precision}",
                                 f"train.output_dir={tmp_path / precision}"])
        run = prepare_run(cfg)
        run.model.train()
        batch = next(iter(run.loader))
        loss, _, _ = forward_backward(run, batch, cfg)
        grads = torch.cat([p.grad.flatten() for p in run.raw_model.parameters() if p.grad is not None])
        results[precision] = (loss.item(), grads)
    (l32, g32), (l16, g16) = results["no"], results["bf16"]
    assert abs(l32 - l16) / abs(l32) < 0.02
    cosine = torch.nn.functional.cosine_similarity(g32, g16, dim=0)
    assert cosine > 0.99
    AcceleratorState._reset_state()


def test_text_query_states_are_encoded_once_and_batched(tiny_world, make_tiny_overrides, tmp_path):
    """query_tokens=text with a frozen Y: the data path encodes each distinct question once (cached) and
    every batch carries the states the model would compute itself."""
    cfg = load_config(None, [*make_tiny_overrides("hybrid"), "model.predictor.query_tokens=text",
                             f"data.train={tiny_world.root / 'train'}", "data.task=mixed", "train.batch_size=16",
                             "train.precision=no", f"train.output_dir={tmp_path / 'run'}"])
    run = prepare_run(cfg)
    assert run.data.cache_hits["queries"] is False
    batch = next(iter(run.loader))
    assert "query_states" in batch and batch["query_states"].shape[:2] == batch["query_ids"].shape
    live = run.raw_model.query_states(batch["query_ids"], batch["query_mask"])
    torch.testing.assert_close(batch["query_states"], live, atol=1e-4, rtol=1e-4)
    loss, finite, _ = forward_backward(run, batch, cfg)
    assert bool(finite) and run.raw_model.predictor.query_in[1].weight.grad.abs().sum() > 0


def test_train_compile_compiles_the_predictor_in_place(tiny_world, make_tiny_overrides, tmp_path, monkeypatch):
    """train.compile=true: the predictor (only) is compiled in place, so parameter names stay."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw)))
    cfg = load_config(None, [*make_tiny_overrides("token"), f"data.train={tiny_world.root / 'train'}",
                             "train.batch_size=8", "train.compile=true", f"train.output_dir={tmp_path / 'run'}"])
    run = prepare_run(cfg)
    assert calls == [("TransformerPredictor", {"dynamic": True})]
    assert any(name.startswith("predictor.blocks.0.") for name, _ in run.raw_model.named_parameters())
