"""The built-in ViT, trained from scratch."""

from __future__ import annotations

import torch
from torch import nn

from vljepa.config import ConfigError, VisionConfig
from vljepa.models.vision.base import HALF, VisionEncoder


class PatchViT(VisionEncoder):
    """A small ViT trained from scratch: patch embedding, learned positions, pre-norm blocks."""

    mean = HALF
    std = HALF

    def __init__(self, cfg: VisionConfig, *, load_weights: bool = True) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(
                f"model.vision.image_size={cfg.image_size} is not divisible by "
                f"model.vision.patch_size={cfg.patch_size}"
            )
        self.cfg = cfg
        self.model_name = "kind=vit (trained from scratch)"
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
        self._init_video()

    def frame_num_tokens(self, image_size: int) -> int:
        return (image_size // self.cfg.patch_size) ** 2

    def _identity_extra(self) -> dict:
        c = self.cfg
        return {"patch_size": c.patch_size, "dim": c.dim, "depth": c.depth, "heads": c.heads}

    def frame_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)  # [B, N, D]
        return self.norm(self.blocks(x + self.pos[:, : x.shape[1]]))
