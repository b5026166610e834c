"""The training objective between predicted and target embeddings, as named terms.

``VLJepaLoss`` returns a dict: every key ending in ``_loss`` is a term of the objective (their sum,
:func:`total_loss`, is what is minimised), the other keys are detached diagnostics. InfoNCE is
bidirectional and spans processes: ``gather_with_grad`` collects every rank's embeddings so the
contrastive batch is global, and gradients flow back to the rank that made them. Samples whose
targets are the same text ("yes", "red") share a ``group`` id: they are one positive, never each
other's negatives.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vljepa.config import ConfigError, LossConfig


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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every process) along dim 0, keeping the autograd graph."""
    return _GatherWithGrad.apply(x) if _distributed() else x


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (e.g. integer group ids) from every process along dim 0."""
    if not _distributed():
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


def info_nce(pred: torch.Tensor, target: torch.Tensor, logit_scale: torch.Tensor,
             groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Bidirectional InfoNCE between L2-normalised ``pred`` and ``target`` ``[B, D]``.

    Each distinct target (``groups`` ``[B]``, int64) is one column, so repeated answers are not
    negatives of each other; in the target -> prediction direction every prediction of the same
    target is a positive.
    """
    b = pred.shape[0]
    if groups is None:
        groups = torch.arange(b, device=pred.device)
    first, inv = first_occurrence(groups)
    logits = logit_scale * pred @ target[first].T  # [B, U]
    pred_to_target = F.cross_entropy(logits, inv)
    positives = inv[None, :] == torch.arange(first.shape[0], device=pred.device)[:, None]  # [U, B]
    lt = logits.T
    target_to_pred = (lt.logsumexp(1) - lt.masked_fill(~positives, float("-inf")).logsumexp(1)).mean()
    with torch.no_grad():
        acc = (logits.argmax(1) == inv).float().mean()
    return {"infonce_loss": (pred_to_target + target_to_pred) / 2, "p2t": pred_to_target.detach(),
            "t2p": target_to_pred.detach(), "batch_acc": acc}


def target_uniformity(target: torch.Tensor, groups: torch.Tensor | None = None, t: float = 2.0) -> torch.Tensor:
    """``log mean exp(-t |z_i - z_j|^2)`` over pairs of distinct L2-normalised targets ``[B, D]``
    (Wang & Isola, 2020): lower is more spread out; 0 with fewer than two distinct targets."""
    if groups is not None:
        target = target[first_occurrence(groups)[0]]
    n = target.shape[0]
    if n < 2:
        return target.sum() * 0.0
    sq = (2 - 2 * target @ target.T).clamp_min(0)  # |a - b|^2 of unit vectors
    i, j = torch.triu_indices(n, n, 1, device=target.device)
    return torch.logsumexp(-t * sq[i, j].float(), 0) - math.log(i.numel())


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Cosine, L2 or smooth-L1 distance between normalised embeddings (no negatives)."""
    if kind == "cosine":
        return (1 - (pred * target).sum(-1)).mean()
    if kind == "l2":
        return (pred - target).pow(2).sum(-1).mean()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none").sum(-1).mean()
    raise ConfigError(f"unknown model.loss.kind '{kind}'; use infonce, cosine, l2 or smooth_l1")


class VLJepaLoss(nn.Module):
    """``model.loss``: InfoNCE with a learnable temperature (or a regression distance), plus an
    optional uniformity term over the distinct targets, weighted by ``target_uniformity``."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        if cfg.kind != "infonce":
            regression_loss(torch.zeros(1, 1), torch.zeros(1, 1), cfg.kind)  # unknown kinds fail at build time
        self.cfg = cfg
        init = math.log(1.0 / cfg.temperature)
        self.logit_scale = nn.Parameter(torch.tensor(init), requires_grad=cfg.learn_temperature)

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """This process's ``pred`` / ``target`` ``[B, D]`` and ``groups`` ``[B]`` -> named terms."""
        cfg = self.cfg
        all_target = gather_with_grad(target) if cfg.kind == "infonce" or cfg.target_uniformity else target
        all_groups = None if groups is None else gather_no_grad(groups)
        if cfg.kind == "infonce":
            scale = self.logit_scale.exp().clamp(max=cfg.max_logit_scale)
            terms = info_nce(gather_with_grad(pred), all_target, scale, all_groups)
            terms["temperature"] = (1.0 / scale).detach()
        else:
            terms = {f"{cfg.kind}_loss": regression_loss(pred, target, cfg.kind)}
        if cfg.target_uniformity > 0:
            terms["uniformity_loss"] = cfg.target_uniformity * target_uniformity(all_target, all_groups)
        return terms


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The objective: the sum of every ``*_loss`` term."""
    return sum(v for k, v in terms.items() if k.endswith("_loss"))
