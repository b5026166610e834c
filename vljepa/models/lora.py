"""The one freeze / LoRA policy of the X- and Y-encoders.

``freeze`` and ``lora`` (a :class:`~vljepa.config.LoraConfig`) decide what trains:

- ``lora.r > 0``: peft LoRA adapters are injected into the pretrained base and only they train,
  whatever ``freeze`` says; ``freeze`` then only keeps the base in eval mode.
- ``lora.r == 0``: ``freeze`` decides for every parameter.

Only a frozen tower without adapters is *static*: its outputs never change, so they are computed
under ``torch.no_grad()``, in eval mode, and can be cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from vljepa.config import ConfigError, LoraConfig

# Layers peft can put an adapter on.
_LORA_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _lora_targets(base: nn.Module, wanted: Sequence[str], skip: Sequence[str] = ()) -> list[str]:
    """Full names of the layers under ``base`` whose name ends with one of ``wanted``.

    Layers under a ``skip`` prefix and the output projection inside ``nn.MultiheadAttention``
    (whose forward never calls it, so an adapter there would be ignored) are left out.
    """
    modules = dict(base.named_modules())
    out = []
    for name, module in modules.items():
        if not isinstance(module, _LORA_LAYER_TYPES) or not any(name == w or name.endswith("." + w) for w in wanted):
            continue
        if _under(name, skip):
            continue
        parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else base
        if isinstance(parent, nn.MultiheadAttention):
            continue
        out.append(name)
    return out


def apply_trainability(encoder: nn.Module, base: nn.Module | None, *, freeze: bool, lora: LoraConfig,
                       default_targets: Sequence[str], key: str, model_name: str, skip: Sequence[str] = (),
                       new: Sequence[str] = ()) -> None:
    """Inject LoRA adapters into ``base`` (a module of ``encoder``) and set every ``requires_grad``.

    ``base`` is the pretrained part LoRA adapts; None for an encoder trained from scratch.

    ``lora.target_modules`` (or ``default_targets`` when it is empty) are layer-name suffixes;
    ``skip`` are parameter prefixes under ``base`` off the output path (pooling heads): never
    adapted, never trained; ``new`` are names of ``encoder`` parameters that are not pretrained
    (a temporal embedding): they train whenever anything in the encoder does. ``key`` is the config
    section (``model.vision``) and ``model_name`` the model that errors name. Adapters are injected
    in place, so state-dict names stay those of the base plus ``lora_*``.
    """
    if lora.r < 0:
        raise ConfigError(f"{key}.lora.r must be >= 0, got {lora.r}")
    if lora.r:
        import peft

        if base is None:
            raise ConfigError(f"{key}: {model_name} has no pretrained base for LoRA to adapt; "
                              f"set {key}.freeze=false instead of {key}.lora.r")
        wanted = list(lora.target_modules) or list(default_targets)
        targets = _lora_targets(base, wanted, skip)
        if not targets:
            layers = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, _LORA_LAYER_TYPES)})
            raise ConfigError(f"{key}.lora.target_modules={wanted} match no linear / conv / attention layer of "
                              f"{model_name}; set it to some of: {', '.join(layers[:20])}")
        peft.inject_adapter_in_model(peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=targets), base)
    static = freeze and not lora.r
    for name, p in encoder.named_parameters():
        if name in new:
            p.requires_grad_(not static)
        elif lora.r:
            p.requires_grad_(".lora_" in name)
        else:
            p.requires_grad_(not freeze)
    if skip:  # prefixes under base
        for name, p in base.named_parameters():
            if _under(name, skip):
                p.requires_grad_(False)


def keep_frozen_base_in_eval(module: nn.Module, mode: bool) -> None:
    """Put ``module`` in eval mode (BatchNorm statistics, dropout of the frozen base stay fixed)
    while the LoRA adapters' dropout follows ``mode``."""
    nn.Module.train(module, False)
    for sub in module.modules():
        if isinstance(getattr(sub, "lora_dropout", None), nn.ModuleDict):
            sub.lora_dropout.train(mode)


class Tower(nn.Module):
    """Base of the X- and Y-encoders: a module whose ``cfg`` has ``freeze`` and ``lora``.

    ``lora_defaults``: LoRA target suffixes used when ``cfg.lora.target_modules`` is ``[]``.
    """

    cfg: Any
    lora_defaults: tuple[str, ...] = ()

    @property
    def static(self) -> bool:
        """Frozen and without adapters: its outputs never change (no graph, eval mode, cacheable)."""
        return self.cfg.freeze and not self.cfg.lora.r

    def train(self, mode: bool = True) -> Tower:
        """A frozen base stays in eval mode (BatchNorm statistics, dropout); LoRA dropout follows ``mode``."""
        super().train(mode)
        if self.cfg.freeze:
            keep_frozen_base_in_eval(self, mode)
        return self
