"""Losses between predicted embeddings and target embeddings.

InfoNCE is bidirectional and may span processes: ``gather_with_grad`` collects every rank's
embeddings so the contrastive batch is global, and gradients flow back to the rank that made them.
Samples whose targets are the same text ("yes", "red") share a ``group`` id: they are one positive,
never each other's negatives.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient and returns this process's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process's loss depends on this process's rows
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every process) along dim 0, keeping the autograd graph."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (e.g. integer group ids) from every process along dim 0."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def first_occurrence(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For group ids ``[B]``: the row of each distinct id's first occurrence ``[U]`` and, for every
    row, the index of its distinct id ``[B]`` (so ``x[rows][inverse]`` rebuilds per-row values)."""
    b = groups.shape[0]
    _, inverse = torch.unique(groups, return_inverse=True)
    rows = torch.full((int(inverse.max()) + 1,), b, dtype=torch.long, device=groups.device)
    rows = rows.scatter_reduce(0, inverse, torch.arange(b, device=groups.device), reduce="amin")
    return rows, inverse


def info_nce(
    pred: torch.Tensor,
    target: torch.Tensor,
    logit_scale: torch.Tensor,
    groups: torch.Tensor | None = None,
    t2p_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Bidirectional InfoNCE between L2-normalised ``pred`` and ``target`` ``[B, D]``.

    ``groups`` ``[B]`` (int64) marks samples whose targets are identical; each distinct target is
    one column, so repeated answers are not treated as negatives of each other. The loss is
    ``(p2t + t2p_weight * t2p) / (1 + t2p_weight)``: 1 is the symmetric loss, 0 prediction -> target only.
    """
    b = pred.shape[0]
    if groups is None:
        groups = torch.arange(b, device=pred.device)
    first, inv = first_occurrence(groups)
    u = first.shape[0]
    logits = logit_scale * pred @ target[first].T  # [B, U]
    pred_to_target = F.cross_entropy(logits, inv)
    # Target -> prediction: every prediction of the same target is a positive.
    positives = inv[None, :] == torch.arange(u, device=pred.device)[:, None]  # [U, B]
    lt = logits.T
    target_to_pred = (lt.logsumexp(1) - lt.masked_fill(~positives, float("-inf")).logsumexp(1)).mean()
    loss = (pred_to_target + t2p_weight * target_to_pred) / (1.0 + t2p_weight)
    with torch.no_grad():
        acc = (logits.argmax(1) == inv).float().mean()
    return {"loss": loss, "p2t": pred_to_target.detach(), "t2p": target_to_pred.detach(), "batch_acc": acc}


def target_uniformity(target: torch.Tensor, groups: torch.Tensor | None = None, t: float = 2.0) -> torch.Tensor:
    """Uniformity of the distinct L2-normalised targets ``[B, D]``: ``log mean exp(-t |z_i - z_j|^2)``
    over pairs of distinct targets (Wang & Isola, 2020). Lower is more spread out; 0 with fewer than
    two distinct targets. Repeated answers (same ``groups`` id) count once.
    """
    if groups is not None:
        target = target[first_occurrence(groups)[0]]
    n = target.shape[0]
    if n < 2:
        return target.sum() * 0.0
    sq = (2 - 2 * target @ target.T).clamp_min(0)  # |a - b|^2 of unit vectors
    i, j = torch.triu_indices(n, n, 1, device=target.device)
    return torch.logsumexp(-t * sq[i, j].float(), 0) - math.log(i.numel())


def target_spread(target: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """How much the head merges texts the Y-encoder keeps apart, for distinct targets ``[U, D]``.

    ``teacher`` ``[U, H]`` are the Y-encoder's pooled embeddings of the same texts. For each target:
    the largest ``max(0, cos_head - cos_Y)`` over the other targets; summed over targets, so a merged
    pair is pushed apart with full weight however many other targets the batch holds (a uniformity
    term averages over all pairs: one merged pair among a thousand barely moves). 0 with fewer than two.
    """
    n = target.shape[0]
    if n < 2:
        return target.sum() * 0.0
    t = F.normalize(target.float(), dim=-1)
    y = F.normalize(teacher.float(), dim=-1)
    excess = (t @ t.T - (y @ y.T).detach()).clamp_min(0)
    excess = excess.masked_fill(torch.eye(n, dtype=torch.bool, device=t.device), 0.0)
    return excess.max(dim=1).values.sum()


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Cosine, L2 or smooth-L1 distance between normalised embeddings (no negatives)."""
    if kind == "cosine":
        loss = (1 - (pred * target).sum(-1)).mean()
    elif kind == "l2":
        loss = (pred - target).pow(2).sum(-1).mean()
    elif kind == "smooth_l1":
        loss = F.smooth_l1_loss(pred, target, reduction="none").sum(-1).mean()
    else:
        raise ValueError(f"unknown loss kind '{kind}'; use infonce, cosine, l2 or smooth_l1")
    return {"loss": loss}
