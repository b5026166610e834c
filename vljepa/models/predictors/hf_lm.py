"""The paper's predictor: the last K decoder layers of a pretrained causal language model.

The layers of a Llama, Qwen2/3 or Gemma/Gemma2/Gemma3 model (the paper: the last 8 layers of
Llama-3.2-1B) run over ``[visual tokens ; query tokens]`` with that model's tokenizer, input token
embeddings, rotary positions and final norm. The causal mask is replaced by a padding-only mask,
so attention is bidirectional.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vljepa.config import ConfigError, PredictorConfig
from vljepa.models.layers import masked_mean
from vljepa.models.predictors.base import Predictor


class HFLMPredictor(Predictor):
    """The last K decoder layers of a pretrained causal LM, run bidirectionally over visual + query tokens.

    Visual tokens go through a trainable linear into the LM width; the query goes through the LM's
    own (frozen) token embeddings. The K layers, the final norm, the visual projection and the output
    head are trained. The token embedding table stays frozen: it is most of a small LM's parameters
    (263M of Llama-3.2-1B's 1.24B), the query vocabulary is already well embedded, and the paper's
    490M trainable predictor is exactly the 8 layers plus the projections. The output is the masked
    mean of the final-norm states, projected to ``target_dim``.
    """

    def __init__(self, *, path: str, num_layers: int, visual_dim: int, target_dim: int, max_query_len: int,
                 load_weights: bool = True, with_tokenizer: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.max_query_len = max_query_len
        local = Path(path).is_dir()
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=local)
            if config.get_text_config() is not config:
                raise ConfigError(f"'{path}' is a multimodal model ({config.model_type}); model.predictor.path needs a "
                                  "text-only causal language model")
            total = config.num_hidden_layers
            if not 1 <= num_layers <= total:
                raise ConfigError(f"model.predictor.num_layers={num_layers} must be between 1 and the {total} "
                                  f"layers of '{path}'")
            attn = _attention_implementation(config)
            if load_weights:
                # The whole base model (no LM head) is read, then only its last K layers are kept.
                self.lm = AutoModel.from_pretrained(path, local_files_only=local, dtype=torch.float32,
                                                    attn_implementation=attn)
                self.lm.layers = self.lm.layers[total - num_layers:]
                _keep_last_layers(self.lm.config, num_layers)
            else:
                cut = copy.deepcopy(config)
                _keep_last_layers(cut, num_layers)
                self.lm = AutoModel.from_config(cut, attn_implementation=attn, dtype=torch.float32)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local) if with_tokenizer else None
        except OSError as exc:
            raise ConfigError(
                f"cannot load language model '{path}' ({exc.__class__.__name__}). Offline, download it elsewhere "
                f"(e.g. `hf download {path} --local-dir DIR`) and set model.predictor.path=DIR"
            ) from exc
        for layer_type in set(getattr(self.lm.config, "layer_types", None) or ()):
            if layer_type not in ("full_attention", "sliding_attention"):
                raise ConfigError(f"'{path}' has '{layer_type}' layers; hf_lm supports full and sliding attention")
        for layer in self.lm.layers:
            layer.self_attn.is_causal = False  # the mask below is the only mask: bidirectional
        self.lm.get_input_embeddings().requires_grad_(False)
        if self.tokenizer is not None:
            if len(self.tokenizer) > self.lm.config.vocab_size:
                raise ConfigError(f"the tokenizer of '{path}' has {len(self.tokenizer)} tokens but the model embeds "
                                  f"{self.lm.config.vocab_size}; the folder's tokenizer does not match its model")
            if self.tokenizer.pad_token is None:  # Llama ships none; padding is masked, any id will do
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.tokenizer.padding_side = "right"
        width = self.lm.config.hidden_size
        self.visual_in = nn.Linear(visual_dim, width)
        self.head = nn.Linear(width, target_dim)

    config_keys = ("path", "num_layers", "max_query_len")

    @classmethod
    def from_config(cls, cfg: PredictorConfig, *, visual_dim: int, num_visual_tokens: int, target_dim: int,
                    text_vocab_size: int,
                    text_hidden_size: int | None, load_weights: bool = True, source: str | None = None,
                    with_tokenizer: bool = True, num_frames: int = 1) -> HFLMPredictor:
        """Queries use the LM's own tokenizer and embeddings; ``source`` is a saved model's ``predictor/``
        folder, which holds the config of the kept layers only."""
        if source is None and not cfg.path:
            raise ConfigError("model.predictor.kind=hf_lm needs model.predictor.path: a causal language model "
                              "folder or Hub id, e.g. meta-llama/Llama-3.2-1B")
        return cls(path=source or cfg.path, num_layers=cfg.num_layers, visual_dim=visual_dim, target_dim=target_dim,
                   max_query_len=cfg.max_query_len, load_weights=load_weights and source is None,
                   with_tokenizer=with_tokenizer)

    def attention_mask(self, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive masks from ``keep`` ``[B, N]``: every token attends to every real token, no causal part.

        Full-attention layers get ``[B, 1, 1, N]`` (broadcast over queries); sliding-window layers
        (Gemma3, some Qwen2) also limit attention to ``|i - j| < sliding_window``, in both directions.
        Families with several layer types take a dict keyed by type.
        """
        n = keep.shape[1]

        def additive(allowed: torch.Tensor) -> torch.Tensor:
            return torch.zeros(allowed.shape, dtype=dtype, device=keep.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)

        full = keep[:, None, None, :]
        types = getattr(self.lm.config, "layer_types", None)
        if not types:
            return additive(full)
        masks = {}
        for layer_type in set(types):
            if layer_type == "sliding_attention":
                pos = torch.arange(n, device=keep.device)
                window = (pos[:, None] - pos[None, :]).abs() < self.lm.config.sliding_window
                masks[layer_type] = additive(full & window[None, None])
            else:
                masks[layer_type] = additive(full)
        return masks

    def forward(self, visual_tokens: torch.Tensor, query_ids: torch.Tensor | None = None,
                query_mask: torch.Tensor | None = None, query_states: torch.Tensor | None = None) -> torch.Tensor:
        """visual_tokens ``[B, N, Dv]``; query_ids / query_mask ``[B, L]`` or None (query-free)."""
        b, n, _ = visual_tokens.shape
        x = self.visual_in(visual_tokens)
        keep = torch.ones(b, n, dtype=torch.bool, device=x.device)
        if query_ids is not None and query_ids.shape[1] > 0:
            if query_ids.shape[1] > self.max_query_len:
                raise ConfigError(f"query of {query_ids.shape[1]} tokens exceeds "
                                  f"model.predictor.max_query_len={self.max_query_len}")
            q = self.lm.get_input_embeddings()(query_ids).to(x.dtype)
            x = torch.cat([x, q], dim=1)
            qmask = torch.ones_like(query_ids) if query_mask is None else query_mask
            keep = torch.cat([keep, qmask.bool()], dim=1)
        positions = torch.arange(x.shape[1], device=x.device)[None]
        states = self.lm(inputs_embeds=x, attention_mask=self.attention_mask(keep, x.dtype), position_ids=positions,
                         use_cache=False).last_hidden_state  # final norm applied
        return self.head(masked_mean(states, keep))  # [B, target_dim]

    def save_files(self, folder: str | Path) -> None:
        """The kept layers' config and the tokenizer; the weights are in the model's state dict."""
        self.lm.config.save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)


def _attention_implementation(config: Any) -> str:
    """``sdpa`` where the family supports it, else ``eager`` (Gemma2); both take the additive masks."""
    from transformers import MODEL_MAPPING

    model_cls = MODEL_MAPPING.get(type(config), None)
    return "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"


def _keep_last_layers(config: Any, k: int) -> None:
    """Make a LM config describe only its last ``k`` layers (per-layer types included)."""
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[-k:])
    config.num_hidden_layers = k
