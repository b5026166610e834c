"""What LoRA on a frozen tower needs from both X and Y: train/eval modes that keep the base frozen."""

from __future__ import annotations

from torch import nn


def keep_frozen_base_in_eval(module: nn.Module, mode: bool) -> None:
    """Put ``module`` in eval mode (BatchNorm statistics, dropout of the frozen base stay fixed)
    while the LoRA adapters' dropout follows ``mode``."""
    nn.Module.train(module, False)
    for sub in module.modules():
        if isinstance(getattr(sub, "lora_dropout", None), nn.ModuleDict):
            sub.lora_dropout.train(mode)
