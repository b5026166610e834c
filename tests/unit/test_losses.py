"""Losses: bidirectional InfoNCE (with shared-target groups), regression losses, gathers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vljepa.config import ConfigError
from vljepa.losses import gather_no_grad, gather_with_grad, info_nce, regression_loss


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_perfect_alignment_with_high_scale_is_near_zero():
    target = torch.eye(6, 8)  # orthonormal rows: every other target has cosine 0
    out = info_nce(target.clone(), target, torch.tensor(100.0))
    assert out["infonce_loss"].item() < 1e-6
    assert out["batch_acc"].item() == 1.0
    assert set(out) == {"infonce_loss", "p2t", "t2p", "batch_acc"}


def test_random_pairs_at_scale_one_are_near_log_batch():
    # With scale 1 the logits are cosines in [-1, 1]: the loss sits near log(B), far from 0.
    out = info_nce(_unit(64, 32, seed=1), _unit(64, 32, seed=2), torch.tensor(1.0))
    assert abs(out["infonce_loss"].item() - math.log(64)) < 0.1


def test_matches_a_hand_computed_cross_entropy():
    pred, target = _unit(5, 4, seed=3), _unit(5, 4, seed=4)
    scale = 7.0
    logits = scale * pred @ target.T
    p2t = sum(-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(5)) / 5
    t2p = sum(-(logits[j, j] - torch.logsumexp(logits[:, j], 0)) for j in range(5)) / 5
    out = info_nce(pred, target, torch.tensor(scale))
    torch.testing.assert_close(out["p2t"], p2t)
    torch.testing.assert_close(out["t2p"], t2p)
    torch.testing.assert_close(out["infonce_loss"], 0.5 * (p2t + t2p))


def test_symmetric_in_pred_and_target():
    a, b = _unit(7, 16, seed=5), _unit(7, 16, seed=6)
    ab = info_nce(a, b, torch.tensor(10.0))
    ba = info_nce(b, a, torch.tensor(10.0))
    torch.testing.assert_close(ab["infonce_loss"], ba["infonce_loss"])
    torch.testing.assert_close(ab["p2t"], ba["t2p"])
    torch.testing.assert_close(ab["t2p"], ba["p2t"])


def test_groups_make_a_duplicate_target_one_positive():
    target = torch.eye(4, 8)
    target[2] = target[0]  # samples 0 and 2 share their answer
    groups = torch.tensor([10, 11, 10, 12])
    perfect = target.clone()
    with_groups = info_nce(perfect, target, torch.tensor(100.0), groups)
    without = info_nce(perfect, target, torch.tensor(100.0))
    assert with_groups["infonce_loss"].item() < 1e-6
    assert with_groups["batch_acc"].item() == 1.0
    # Without groups the twin column is a negative as good as the positive: log(2) on those rows.
    expected = 0.5 * (2 * math.log(2) / 4 + 2 * math.log(2) / 4)
    assert without["infonce_loss"].item() == pytest.approx(expected, abs=1e-4)


def test_groups_equal_the_loss_on_deduplicated_columns_by_hand():
    b = 6
    pred = _unit(b, 8, seed=7)
    target = _unit(b, 8, seed=8)
    groups = torch.tensor([3, 1, 3, 0, 1, 3])
    for i, g in enumerate(groups.tolist()):  # identical answers have identical targets
        target[i] = target[groups.tolist().index(g)]
    scale = 5.0
    # Columns: the distinct targets, in sorted group order (0, 1, 3).
    cols = [0, 1, 3]
    col_rows = [groups.tolist().index(g) for g in cols]
    logits = scale * pred @ target[col_rows].T  # [B, U]
    label = [cols.index(g) for g in groups.tolist()]
    p2t = sum(-(logits[i, label[i]] - torch.logsumexp(logits[i], 0)) for i in range(b)) / b
    # Target -> prediction: every prediction of that target is a positive (one softmax event).
    t2p = 0.0
    for u in range(len(cols)):
        pos = [i for i in range(b) if label[i] == u]
        t2p += -(torch.logsumexp(logits[pos, u], 0) - torch.logsumexp(logits[:, u], 0))
    t2p = t2p / len(cols)
    out = info_nce(pred, target, torch.tensor(scale), groups)
    torch.testing.assert_close(out["p2t"], p2t)
    torch.testing.assert_close(out["t2p"], t2p)
    torch.testing.assert_close(out["infonce_loss"], 0.5 * (p2t + t2p))
    # Distinct groups behave exactly like no groups at all.
    torch.testing.assert_close(info_nce(pred, target, torch.tensor(scale), torch.arange(b) * 2)["infonce_loss"],
                               info_nce(pred, target, torch.tensor(scale))["infonce_loss"])


def test_gradients_reach_pred_target_and_scale():
    pred = _unit(4, 8, seed=9).requires_grad_()
    target = _unit(4, 8, seed=10).requires_grad_()
    scale = torch.tensor(3.0, requires_grad=True)
    info_nce(pred, target, scale, torch.tensor([0, 0, 1, 2]))["infonce_loss"].backward()
    for t in (pred, target, scale):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_regression_losses_on_hand_cases():
    pred = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    target = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    # cosine: 1 - <p, t>, averaged: (1 + 0) / 2
    assert regression_loss(pred, target, "cosine").item() == pytest.approx(0.5)
    # l2: squared distance summed over dims: (2 + 0) / 2
    assert regression_loss(pred, target, "l2").item() == pytest.approx(1.0)
    # smooth-L1 (beta 1): |d| < 1 -> d^2 / 2, else |d| - 1/2; summed over dims, mean over rows.
    p = torch.tensor([[0.5, 0.0]])
    t = torch.tensor([[0.0, 2.0]])
    assert regression_loss(p, t, "smooth_l1").item() == pytest.approx(0.125 + 1.5)
    assert regression_loss(pred, pred, "smooth_l1").item() == 0.0


def test_regression_loss_unknown_kind():
    with pytest.raises(ConfigError, match="unknown model.loss.kind 'mse'; use infonce, cosine, l2 or smooth_l1"):
        regression_loss(torch.zeros(1, 2), torch.zeros(1, 2), "mse")


def test_gathers_are_identity_without_a_process_group():
    assert not dist.is_initialized()
    x = torch.randn(3, 4, requires_grad=True)
    g = torch.tensor([1, 2, 3])
    assert gather_with_grad(x) is x
    assert gather_no_grad(g) is g


def test_gathers_are_identity_in_a_one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.randn(3, 4, requires_grad=True)
        g = torch.tensor([1, 2, 3])
        assert gather_with_grad(x) is x
        assert gather_no_grad(g) is g
    finally:
        dist.destroy_process_group()


def test_target_uniformity_hand_values_and_groups():
    from vljepa.losses import target_uniformity

    e = torch.eye(3)
    # Orthogonal unit vectors are sqrt(2) apart: log mean exp(-2 * 2) = -4.
    assert float(target_uniformity(e)) == pytest.approx(-4.0, abs=1e-6)
    # Identical targets give the maximum, 0; a single target has no pair and gives 0.
    assert float(target_uniformity(e[[0, 0]])) == pytest.approx(0.0, abs=1e-6)
    assert float(target_uniformity(e[:1])) == 0.0
    # A repeated answer counts once: [a, a, b] with groups [0, 0, 1] is the pair (a, b) alone.
    torch.testing.assert_close(target_uniformity(e[[0, 0, 1]], torch.tensor([0, 0, 1])), target_uniformity(e[:2]))
    assert float(target_uniformity(e[[0, 0, 1]])) > -4.0  # without groups the duplicate pair pulls it up


def test_target_uniformity_gradient_spreads_close_targets():
    from vljepa.losses import target_uniformity

    z = torch.tensor([[1.0, 0.05, 0.0], [1.0, -0.05, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    before = F.normalize(z, dim=-1)
    target_uniformity(before).backward()
    after = F.normalize((z - 0.1 * z.grad).detach(), dim=-1)
    assert float(after[0] @ after[1]) < float(before.detach()[0] @ before.detach()[1])  # "yes" and "no" move apart


def test_loss_module_returns_named_terms_whose_sum_is_the_objective():
    from vljepa.config import LossConfig
    from vljepa.losses import VLJepaLoss, target_uniformity, total_loss

    pred, target = _unit(6, 8, seed=3), _unit(6, 8, seed=4)
    groups = torch.tensor([0, 1, 0, 2, 3, 1])
    loss = VLJepaLoss(LossConfig(temperature=0.1, target_uniformity=0.5))
    terms = loss(pred, target, groups)
    assert set(terms) == {"infonce_loss", "uniformity_loss", "p2t", "t2p", "batch_acc", "temperature"}
    ref = info_nce(pred, target, torch.tensor(10.0), groups)["infonce_loss"]
    torch.testing.assert_close(terms["infonce_loss"], ref)
    torch.testing.assert_close(terms["uniformity_loss"], 0.5 * target_uniformity(target, groups))
    torch.testing.assert_close(total_loss(terms), terms["infonce_loss"] + terms["uniformity_loss"])
    regression = VLJepaLoss(LossConfig(kind="l2"))(pred, target)
    assert set(regression) == {"l2_loss"}
    with pytest.raises(ConfigError, match="unknown model.loss.kind 'mse'"):
        VLJepaLoss(LossConfig(kind="mse"))
