"""Parameter groups, learning-rate multipliers and schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from vljepa.config import ModelConfig, OptimConfig


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norms, embeddings, position tables and the temperature are not weight-decayed.
    return param.ndim < 2 or any(k in name for k in ("embed", "pos", "logit_scale"))


def param_groups(model: nn.Module, cfg: OptimConfig, *, text_lr_mult: float | None = None) -> list[dict]:
    """AdamW groups: (part lr multiplier) x (decay / no decay); frozen parameters are left out.

    Trainable Y-encoder parameters get ``model.config.text.lr_mult`` (the paper's 0.05), whether
    the whole tower is trained or only its LoRA adapters on a frozen base. ``text_lr_mult``, when
    given, overrides it for the tower's own (non-adapter) parameters; the adapters always take the
    configured multiplier, so a caller passing 0.0 for a frozen base still trains them.
    """
    text_cfg = model.config.text if isinstance(getattr(model, "config", None), ModelConfig) else None
    configured = text_cfg.lr_mult if text_cfg is not None else 1.0
    tower = configured if text_lr_mult is None else text_lr_mult
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("target_head."):
            mult = cfg.head_lr_mult
        elif name.startswith("text."):
            mult = configured if "lora_" in name else tower
        else:
            mult = 1.0
        groups.setdefault((mult, _no_decay(name, p)), []).append(p)
    return [
        {"params": ps, "lr": cfg.lr * mult, "lr_mult": mult, "weight_decay": 0.0 if nd else cfg.weight_decay}
        for (mult, nd), ps in groups.items()
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, text_lr_mult: float | None = None,
                    device: torch.device | str | None = None) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; an error when nothing is trainable.

    ``device``: where the parameters will be trained (default: where they are now). On the CPU and
    CUDA the fused AdamW kernel is used: one pass over all tensors instead of a loop over them.
    """
    groups = param_groups(model, cfg, text_lr_mult=text_lr_mult)
    if not groups:
        raise ValueError("no trainable parameters: every part of the model is frozen")
    kind = torch.device(device).type if device is not None else groups[0]["params"][0].device.type
    fused = kind in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup, then constant or a cosine decay to ``min_ratio`` of the peak at step ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """A per-step ``LambdaLR`` following :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total=total_steps, warmup=cfg.warmup_steps, schedule=cfg.schedule,
                               min_ratio=cfg.min_lr_ratio),
    )
