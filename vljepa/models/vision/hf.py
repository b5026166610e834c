"""Hugging Face vision models (``AutoModel``) as X-encoders: CLIP / SigLIP vision towers, DINOv2, ViT, V-JEPA 2."""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from vljepa.config import ConfigError, VisionConfig
from vljepa.models.vision.base import (HALF, IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                       VisionEncoder)

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
    """A Hugging Face vision model (``AutoModel``) from a local folder or Hub id in ``cfg.path``.

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
        if cfg.name:
            raise ConfigError(f"model.vision.name='{cfg.name}' is not used by kind=hf (the architecture and weights "
                              "come from model.vision.path); leave it empty")
        name = source or cfg.path
        if not name or name.startswith("package:"):
            raise ConfigError(f"model.vision.kind=hf needs model.vision.path (got '{name}'): a local model folder or "
                              "a Hub id such as facebook/dinov2-small")
        self.model_name = cfg.path
        local = Path(name).expanduser().is_dir()
        if local:
            name = str(Path(name).expanduser())
        elif name.startswith((".", "/", "~")):
            raise ConfigError(f"model.vision.path '{name}' is not a folder; point it at a local model folder")
        with _offline_hint(cfg.path):
            try:
                full_config = AutoConfig.from_pretrained(name, local_files_only=local)
            except ValueError as exc:  # an unknown model type
                raise ConfigError(f"'{cfg.path}' is not a model transformers can build: {exc}") from exc
        config = getattr(full_config, "vision_config", None) or full_config  # CLIP / SigLIP -> vision part
        self.model_type = config.model_type
        if self.model_type == "siglip2_vision_model":
            raise ConfigError(f"'{cfg.path}' is a SigLIP 2 NaFlex tower, which takes patchified pixels with a mask; "
                              "use kind=open_clip with a SigLIP 2 architecture (e.g. model.vision.name=ViT-B-16-SigLIP2) "
                              "instead")
        patch = getattr(config, "patch_size", None)
        if patch is None:
            raise ConfigError(f"'{cfg.path}' ({self.model_type}) has no patch grid (config.patch_size); kind=hf "
                              "supports ViT-style models (CLIP, SigLIP, DINOv2, ViT, V-JEPA 2); use kind=timm for CNNs")
        self.native_video = self.model_type == "vjepa2"
        if self.native_video:
            self.tubelet = config.tubelet_size
            if cfg.num_frames > 1 and cfg.num_frames % self.tubelet:
                raise ConfigError(f"model.vision.num_frames={cfg.num_frames} must be a multiple of the "
                                  f"tubelet size {self.tubelet} of '{cfg.path}'")
        if not load_weights or source is not None:
            model = AutoModel.from_config(config)
        elif full_config.model_type in HF_DUAL_ENCODERS:
            # The pair loads as a whole (its vision_model is the class from_config builds), so the
            # text tower's weights are not reported as unexpected; only the vision part is kept.
            with _offline_hint(cfg.path):
                model = AutoModel.from_pretrained(name, dtype=torch.float32, local_files_only=local).vision_model
        else:
            with _offline_hint(cfg.path):
                model, info = AutoModel.from_pretrained(name, config=config, dtype=torch.float32,
                                                        local_files_only=local, output_loading_info=True)
            off = HF_OFF_PATH.get(self.model_type, ())
            missing = [k for k in info["missing_keys"] if not any(k.startswith(o) for o in off)]
            if missing:
                raise ConfigError(f"the weights in '{cfg.path}' do not fit its {type(model).__name__}: "
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
            raise ConfigError(f"'{self.cfg.path}' ({self.model_type}) does not return one token per patch "
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
            f"(`hf download {name} --local-dir DIR`) and set model.vision.path to that local folder "
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
