"""The text tower of an open_clip model as a Y-encoder.

``text.name`` is the architecture (``ViT-B-32``); ``text.path`` the pretrained tag, a local
checkpoint file, or an ``hf-hub:`` / ``local-dir:`` name. The pooled output is the tower's text
embedding (after its projection); token states are the tower's final-layer tokens, so every
target head works with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vljepa.config import ConfigError, TextConfig
from vljepa.models.text.base import TextEncoder, TextEncoding


class OpenCLIPTextEncoder(TextEncoder):
    """The text tower of an open_clip model; its vision tower is dropped after loading."""

    # torch MultiheadAttention (open_clip's own tower), or the projections of a Hugging Face tower.
    lora_defaults = ("attn", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")

    def __init__(self, cfg: TextConfig, *, load_weights: bool = True, source: str | None = None,
                 with_tokenizer: bool = True) -> None:
        super().__init__()
        import open_clip

        self.cfg = cfg
        if cfg.path.startswith("package:"):
            raise ConfigError(f"model.text.path '{cfg.path}' is a Hugging Face text model; with kind=open_clip set "
                              "model.text.name (e.g. ViT-B-32) and model.text.path to a pretrained tag, a checkpoint "
                              "file, an hf-hub: or local-dir: name, or '' for random weights")
        schema = cfg.path.startswith(("hf-hub:", "local-dir:"))
        if source is not None:  # a saved vljepa model: architecture from its files, weights from its state dict
            name, pretrained, load_weights = f"local-dir:{source}", None, False
        elif schema:
            name, pretrained = cfg.path, None
        elif cfg.name:
            name, pretrained = cfg.name, cfg.path or None
        else:
            raise ConfigError("model.text.kind=open_clip needs model.text.name (an open_clip model name such as "
                              "ViT-B-32), or model.text.path=hf-hub:owner/name")
        self.source = self.model_name = name
        try:
            self.model_cfg = open_clip.get_model_config(name)
            if self.model_cfg is None:
                raise ConfigError(f"unknown open_clip model '{name}'; see open_clip.list_models() or use hf-hub:")
            clip = open_clip.create_model(name, pretrained=pretrained if load_weights else None,
                                          load_weights=load_weights, pretrained_text=load_weights,
                                          force_custom_text=True, device=torch.empty(0).device)
            self.tokenizer = open_clip.get_tokenizer(name) if with_tokenizer else None
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"cannot load open_clip model '{name}' (pretrained {pretrained!r}): {exc}. Offline, "
                              "give model.text.path as a local checkpoint file or local-dir:FOLDER") from exc
        self.tower = clip.text
        if hasattr(self.tower, "output_tokens"):
            self.tower.output_tokens = True
            self.hidden_size = self.tower.width if hasattr(self.tower, "width") else self.tower.config.hidden_size
        else:
            self.hidden_size = None
        self.pooled_size = self.model_cfg["embed_dim"]
        self.vocab_size = self.tower.vocab_size
        self.context_length = self.tower.context_length
        self.pad_id = getattr(self.tower, "pad_id", 0)

    @property
    def base(self) -> nn.Module:
        return self.tower

    def identity(self) -> dict:
        return {"kind": "open_clip", "name": self.cfg.name, "path": self.cfg.path, "normalize": self.cfg.normalize}

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Ids padded to the tower's context length (its positions and causal mask have that size)."""
        self._need_tokenizer()
        ids = self.tokenizer(list(texts)).long()
        # Real tokens run up to the last non-pad id (CLIP pads with 0, which is also the id of "!").
        real = ids != self.pad_id
        last = torch.where(real, torch.arange(ids.shape[1]), -1).amax(1, keepdim=True)
        mask = (torch.arange(ids.shape[1]) <= last).long()
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding:
        out = self.tower(input_ids)
        pooled, states = out if isinstance(out, tuple) else (out, None)
        if self.cfg.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return TextEncoding(states=states, mask=attention_mask, pooled=pooled)

    def save_files(self, folder: str | Path) -> None:
        """``open_clip_config.json`` in open_clip's local-dir format (the weights are in the state dict)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": self.model_cfg}, indent=2))
