"""X-encoders: vision backbones that turn images (or clips) into visual tokens ``[B, N, D]``.

Every encoder is built from a :class:`~vljepa.config.VisionConfig` through the ``VISION_ENCODERS``
registry, chosen by ``cfg.kind``. ``cfg.name`` is the architecture where the kind needs one,
``cfg.path`` where the pretrained weights come from:

- ``vit``: a small ViT trained from scratch (``base.py`` for the interface, ``vit.py``).
- ``timm`` / ``efficientnet_lite0``: one stage of a timm CNN's feature pyramid (``timm.py``);
  ``name`` = timm model, ``path`` = a weights file, ``package:efficientnet-lite0`` or ``""``.
- ``open_clip``: the visual tower of an open_clip model (``open_clip.py``); ``name`` = architecture,
  ``path`` = pretrained tag, checkpoint file, downloaded folder or ``hf-hub:owner/name``.
- ``hf``: a Hugging Face vision model (CLIP / SigLIP vision towers, DINOv2, ViT, V-JEPA 2, ...)
  from the local folder or Hub id in ``path`` (``hf.py``).

Frozen by default; what trains follows :func:`vljepa.models.lora.apply_trainability` (LoRA
adapters on the backbone with ``cfg.lora.r > 0``). ``VisionEncoder.static`` tells whether the
encoder's outputs can change during training.
"""

from __future__ import annotations

from vljepa.config import ConfigError, VisionConfig
from vljepa.models.lora import apply_trainability
from vljepa.models.vision.base import (
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VisionEncoder,
)
from vljepa.models.vision.hf import HFVisionEncoder
from vljepa.models.vision.open_clip import OpenClipEncoder
from vljepa.models.vision.timm import (
    EfficientNetLite0,
    TimmEncoder,
    efficientnet_lite0_state_dict,
    efficientnet_lite0_weights_path,
)
from vljepa.models.vision.vit import PatchViT

__all__ = [
    "HALF", "IMAGENET_MEAN", "IMAGENET_STD", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "VISION_ENCODERS",
    "EfficientNetLite0", "HFVisionEncoder", "OpenClipEncoder", "PatchViT", "TimmEncoder", "VisionEncoder",
    "build_vision_encoder", "efficientnet_lite0_state_dict", "efficientnet_lite0_weights_path",
]

VISION_ENCODERS: dict[str, type[VisionEncoder]] = {
    "vit": PatchViT,
    "timm": TimmEncoder,
    "efficientnet_lite0": EfficientNetLite0,
    "open_clip": OpenClipEncoder,
    "hf": HFVisionEncoder,
}


def build_vision_encoder(cfg: VisionConfig, *, load_weights: bool = True, source: str | None = None) -> VisionEncoder:
    """Build the X-encoder named by ``cfg.kind`` and set what trains (``cfg.freeze``, ``cfg.lora``).

    ``load_weights=False`` builds the architecture without pretrained weights (a saved model's
    state dict follows). ``source``: a folder written by ``VisionEncoder.save_files``, read instead
    of ``cfg.name`` / ``cfg.path`` to rebuild the architecture (open_clip / hf); no weights.
    """
    if cfg.kind not in VISION_ENCODERS:
        raise ConfigError(f"unknown model.vision.kind '{cfg.kind}'; choose one of {sorted(VISION_ENCODERS)}")
    encoder_cls = VISION_ENCODERS[cfg.kind]
    if cfg.fold_stages and not issubclass(encoder_cls, TimmEncoder):
        raise ConfigError(
            f"model.vision.fold_stages folds a CNN's finer feature maps into its token grid; kind={cfg.kind} has no "
            "feature pyramid: drop the option, or use kind=efficientnet_lite0 / timm"
        )
    if source is not None and encoder_cls in (OpenClipEncoder, HFVisionEncoder):
        encoder = encoder_cls(cfg, load_weights=False, source=source)
    else:
        encoder = encoder_cls(cfg, load_weights=load_weights)
    apply_trainability(encoder, getattr(encoder, "backbone", None), freeze=cfg.freeze, lora=cfg.lora,
                       default_targets=encoder.lora_defaults, key="model.vision", model_name=encoder.model_name,
                       skip=encoder.off_path, new=("temporal_embed",))
    return encoder.train()  # a frozen base stays in eval mode (Tower.train)
