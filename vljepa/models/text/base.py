"""The interface every Y-encoder implements, and the poolings a sentence-transformers folder names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vljepa.config import ConfigError, TextConfig
from vljepa.models.layers import masked_mean
from vljepa.models.lora import Tower

# sentence-transformers writes pooling either as one flag per mode (up to v5) or as "pooling_mode".
_POOLING_FLAGS = (("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last"),
                  ("pooling_mode_mean_tokens", "mean"))
_POOLING_NAMES = {"cls": "cls", "lasttoken": "last", "mean": "mean"}


def read_pooling_file(cfg_file: Path) -> str:
    """The pooling (``mean`` / ``cls`` / ``last``) a sentence-transformers ``1_Pooling/config.json`` names."""
    cfg = json.loads(cfg_file.read_text())
    mode = cfg.get("pooling_mode")
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if isinstance(mode, str) and mode in _POOLING_NAMES:
        return _POOLING_NAMES[mode]
    if mode is None:
        for key, name in _POOLING_FLAGS:
            if cfg.get(key):
                return name
    raise ConfigError(f"'{cfg_file}' asks for a pooling vljepa does not support; set model.text.pooling")


def read_pooling(folder: str | Path) -> str:
    """The pooling a sentence-transformers folder prescribes (``mean`` when it says nothing)."""
    cfg_file = Path(folder) / "1_Pooling" / "config.json"
    return read_pooling_file(cfg_file) if cfg_file.is_file() else "mean"


def pool(states: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states ``[B, L, H]`` under ``mask`` ``[B, L]`` into ``[B, H]``."""
    if mode == "mean":
        return masked_mean(states, mask)
    if mode == "cls":
        return states[:, 0]
    if mode == "last":
        last = mask.long().sum(1) - 1  # right padding: the last real token
        return states[torch.arange(states.shape[0], device=states.device), last]
    raise ConfigError(f"unknown pooling '{mode}'; use mean, cls or last")


@dataclass
class TextEncoding:
    states: torch.Tensor | None  # [B, L, hidden_size] last hidden states (None: the tower does not expose them)
    mask: torch.Tensor  # [B, L] 1 for real tokens
    pooled: torch.Tensor  # [B, pooled_size]


class TextEncoder(Tower):
    """Common interface of the Y-encoders.

    ``forward(input_ids, attention_mask)`` returns a :class:`TextEncoding`. ``pooled_size`` is the
    width of ``pooled`` (what the linear / mlp target heads read); ``hidden_size`` the width of the
    token ``states``, as Hugging Face names it (what the token head reads), and None when the tower
    does not expose its token states; ``vocab_size`` the tokenizer's size. ``tokenizer`` is None
    when the encoder was built for counting parameters only (``with_tokenizer=False``). The
    pretrained network LoRA adapts is ``base``.
    """

    cfg: TextConfig
    pooled_size: int
    hidden_size: int | None
    vocab_size: int
    tokenizer: Any
    model_name: str  # what errors call the model

    @property
    def base(self) -> torch.nn.Module:
        """The pretrained network (the transformer, or the open_clip text tower)."""
        raise NotImplementedError

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ConfigError("this text encoder was built without a tokenizer (with_tokenizer=False, for counting "
                              "parameters); build it with its tokenizer to encode text")

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` ``[B, L]``."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What determines this encoder's outputs (for embedding-cache keys)."""
        raise NotImplementedError

    def save_files(self, folder: str | Path) -> None:
        """Write what rebuilds this encoder without its weights (they live in the model's state dict)."""
        raise NotImplementedError
