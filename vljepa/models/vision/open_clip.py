"""The visual tower of an open_clip model as an X-encoder."""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path

import torch

from vljepa.config import ConfigError, VisionConfig
from vljepa.models.vision.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionEncoder

OPEN_CLIP_CONFIG = "open_clip_config.json"


class OpenClipEncoder(VisionEncoder):
    """The visual tower of an open_clip model; tokens are its per-patch output tokens.

    Tokens are the tower's own token output (``output_tokens``): after the final LayerNorm
    (``ln_post``), *not* multiplied by the image projection, which open_clip trains for the pooled
    embedding only; so ``out_dim`` is the tower's width. Towers built on timm (SigLIP, ConvNeXt, ...)
    give the trunk's ``forward_features`` with prefix tokens dropped. The pooling / projection
    parameters are kept (checkpoints load strictly) but never trained.

    ``cfg.name`` is the architecture (``open_clip.list_models()``); ``cfg.path`` the weights: ``""``
    (random init), a pretrained tag (``open_clip.list_pretrained_tags_by_model``), a checkpoint file
    of the whole CLIP model, a downloaded repository folder (``open_clip_config.json`` + weights) or
    ``hf-hub:owner/name`` (which also gives the architecture).
    """

    lora_defaults = ("attn", "attn.qkv", "attn.proj")  # MultiheadAttention (open_clip ViT) / timm ViT attention

    def __init__(self, cfg: VisionConfig, *, load_weights: bool = True, source: str | None = None) -> None:
        super().__init__()
        import open_clip
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        self.cfg = cfg
        model_id, tag_or_file = self._resolve(cfg, source)
        self.model_name = model_id
        try:
            model = open_clip.create_model(model_id, pretrained=tag_or_file if load_weights else None,
                                           load_weights=load_weights, force_image_size=cfg.image_size)
        except (RuntimeError, OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot build open_clip model '{model_id}' with model.vision.path='{cfg.path}' "
                f"({exc}). Offline, a pretrained tag or hf-hub: name needs its files in the Hugging Face "
                "cache: download them elsewhere and set model.vision.path to the checkpoint file "
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
        path = cfg.path
        if path.startswith("package:"):
            raise ConfigError(f"model.vision.path='{path}' names packaged weights, which only kind=efficientnet_lite0 "
                              "reads; with kind=open_clip set it to a pretrained tag, a checkpoint file, a downloaded "
                              "folder, hf-hub:owner/name, or '' for random initialisation")
        if path.startswith("hf-hub:"):
            return path, None
        if path and Path(path).expanduser().is_dir():
            return f"local-dir:{Path(path).expanduser()}", None
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
        if not path or open_clip.get_pretrained_cfg(cfg.name, path):
            return cfg.name, path or None
        file = Path(path).expanduser()
        if file.is_file():
            return cfg.name, str(file)
        tags = open_clip.list_pretrained_tags_by_model(cfg.name)
        raise ConfigError(f"model.vision.path='{path}' is neither a file nor a pretrained tag of "
                          f"{cfg.name} (tags: {', '.join(tags) or 'none'})")

    @staticmethod
    def _preprocess(cfg: VisionConfig, model_id: str, built: dict) -> dict:
        """Mean / std: the folder's or Hub repository's config, the tag's, else what the
        architecture's tags agree on (a bare checkpoint file carries no preprocessing)."""
        import open_clip

        if model_id.startswith(("local-dir:", "hf-hub:")):
            return dict(built)
        tags = [cfg.path] if open_clip.get_pretrained_cfg(model_id, cfg.path) else \
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
