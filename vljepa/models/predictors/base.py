"""What every predictor kind offers the model: one interface, whatever is inside."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vljepa.config import PredictorConfig


class Predictor(nn.Module):
    """Maps visual tokens and a query to a predicted answer embedding ``[B, target_dim]``.

    ``forward(visual_tokens [B, N, Dv], query_ids [B, L] | None, query_mask [B, L] | None,
    query_states [B, L, H] | None)`` runs one padded block of rows; no query (None, or L = 0) is
    query-free. ``query_states`` are the Y-encoder's token states of the query, passed only to
    kinds that set ``reads_query_states``. ``tokenizer`` is the kind's own query tokenizer, or
    None to tokenise queries with the Y-encoder's. ``config_keys`` names the
    ``model.predictor`` keys the kind reads (besides ``kind``); setting any other is an error.
    """

    tokenizer: Any = None
    reads_query_states: bool = False
    max_query_len: int
    config_keys: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: PredictorConfig, *, visual_dim: int, num_visual_tokens: int, target_dim: int,
                    text_vocab_size: int,
                    text_hidden_size: int | None, load_weights: bool = True, source: str | None = None,
                    with_tokenizer: bool = True, num_frames: int = 1) -> Predictor:
        """Build from ``model.predictor``; ``source`` is a saved model's ``predictor/`` folder;
        ``num_frames``: the visual tokens are that many frames' tokens, in time order."""
        raise NotImplementedError

    def forward(self, visual_tokens: torch.Tensor, query_ids: torch.Tensor | None = None,
                query_mask: torch.Tensor | None = None, query_states: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def save_files(self, folder: str | Path) -> None:
        """Write what rebuilds the architecture besides the state dict (nothing for most kinds)."""
