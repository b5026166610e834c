"""The interface every X-encoder implements, and the video handling they share.

Token conventions: tokens are per-patch features in raster order with no pooling; class and
register tokens are dropped. The predictor adds its own position embedding. Video
(``num_frames = T > 1``): pixels are ``[B, T, 3, H, W]``; image encoders run on each frame and the
frames' tokens are concatenated in time order (``[B, T * N, D]``) after adding a learned temporal
embedding per frame; an encoder that reads clips natively (V-JEPA 2) sets ``native_video``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vljepa.config import ConfigError, VisionConfig
from vljepa.models.lora import Tower

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


class VisionEncoder(Tower):
    """Common interface of every X-encoder.

    ``forward(pixel_values)`` takes ``[B, 3, H, W]`` (``cfg.num_frames == 1``) or ``[B, T, 3, H, W]``
    (``T = cfg.num_frames > 1``) and returns tokens ``[B, num_tokens(H), out_dim]``. Subclasses
    implement ``frame_tokens`` (one image -> ``[B, N, D]``) and ``frame_num_tokens``; an encoder that
    reads clips natively sets ``native_video`` and implements ``clip_tokens`` / ``num_tokens``.
    A pretrained encoder keeps its pretrained network in ``backbone`` (what LoRA adapts).
    """

    cfg: VisionConfig
    model_name: str  # what errors call the model: its architecture, or the folder / Hub id it comes from
    out_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_image_size: int | None = None  # the input size the backbone was trained at, when known
    native_video: bool = False
    off_path: tuple[str, ...] = ()  # backbone parameter prefixes outside the token path (pooling heads): never trained

    # ------------------------------------------------------------------ to implement

    def frame_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, N, out_dim]`` of images ``[B, 3, H, W]``."""
        raise NotImplementedError

    def frame_num_tokens(self, image_size: int) -> int:
        """Tokens per image of side ``image_size``."""
        raise NotImplementedError

    def clip_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, N, out_dim]`` of clips ``[B, T, 3, H, W]`` (``native_video`` encoders only)."""
        raise NotImplementedError

    def save_files(self, folder: str | Path) -> None:
        """Write what rebuilds this architecture without its source (``build_vision_encoder(source=)``).

        Only encoders whose architecture comes from outside the config (a model folder, a Hub
        repository) write anything.
        """

    # ------------------------------------------------------------------ shared behaviour

    def num_tokens(self, image_size: int) -> int:
        """Tokens per sample (all frames of a clip together)."""
        return self.frame_num_tokens(image_size) * self.cfg.num_frames

    def identity(self) -> dict:
        """What determines this encoder's outputs besides its weights (for embedding-cache keys)."""
        c = self.cfg
        lora = None
        if c.lora.r:
            lora = {"r": c.lora.r, "alpha": c.lora.alpha, "dropout": c.lora.dropout,
                    "target_modules": list(c.lora.target_modules)}
        return {"kind": c.kind, "name": c.name, "path": c.path, "image_size": c.image_size,
                "num_frames": c.num_frames, "lora": lora, **self._identity_extra()}

    def _identity_extra(self) -> dict:
        return {}

    def _init_video(self) -> None:
        """Per-frame encoders of clips get a learned temporal embedding ``[T, 1, out_dim]``."""
        t = self.cfg.num_frames
        if t < 1:
            raise ConfigError(f"model.vision.num_frames must be >= 1, got {t}")
        if t > 1 and not self.native_video:
            self.temporal_embed = nn.Parameter(torch.zeros(t, 1, self.out_dim))
            nn.init.trunc_normal_(self.temporal_embed, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        t = self.cfg.num_frames
        if t == 1:
            if pixel_values.ndim != 4:
                raise ValueError(f"expected pixel_values [B, 3, H, W], got {tuple(pixel_values.shape)} "
                                 "(set model.vision.num_frames for clips)")
            return self.frame_tokens(pixel_values)
        if pixel_values.ndim != 5 or pixel_values.shape[1] != t:
            raise ValueError(f"expected pixel_values [B, {t}, 3, H, W] (model.vision.num_frames={t}), "
                             f"got {tuple(pixel_values.shape)}")
        if self.native_video:
            return self.clip_tokens(pixel_values)
        b = pixel_values.shape[0]
        tokens = self.frame_tokens(pixel_values.flatten(0, 1))  # [B * T, N, D]
        tokens = tokens.unflatten(0, (b, t)) + self.temporal_embed.to(tokens.dtype)  # [B, T, N, D]
        return tokens.flatten(1, 2)  # [B, T * N, D], frames in time order
