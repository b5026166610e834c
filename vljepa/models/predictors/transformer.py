"""The built-in predictor: a bidirectional transformer over ``[visual tokens ; query tokens]``.

Visual tokens enter through a linear map with learned and fixed positions (the 2-D grid of each
frame, plus the frame index for video); query tokens are either learned embeddings of the Y
tokenizer's vocabulary or the frozen Y-encoder's token states of the query through a linear map. Attention has no causal mask. The masked mean of the
output tokens, through a linear head, is the predicted answer embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from vljepa.config import ConfigError, PredictorConfig
from vljepa.models.layers import Block, masked_mean, visual_position_encoding
from vljepa.models.predictors.base import Predictor


class TransformerPredictor(Predictor):
    """``pool="all"`` reads the answer off every token; ``pool="query"`` off the query tokens (a
    query-free row off its visual tokens). ``query_tokens="learned"`` trains a word table from
    scratch; ``"text"`` reads the Y-encoder's token states of the query (``reads_query_states``)."""

    config_keys = ("dim", "depth", "heads", "mlp_ratio", "dropout", "max_query_len", "max_visual_tokens",
                   "mlp", "pool", "query_tokens")

    def __init__(self, *, visual_dim: int, dim: int, depth: int, heads: int, target_dim: int, vocab_size: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, max_query_len: int = 32,
                 max_visual_tokens: int = 256, mlp: str = "gelu", pool: str = "all", query_tokens: str = "learned",
                 text_hidden_size: int | None = None, frames: int = 1) -> None:
        super().__init__()
        if pool not in ("all", "query"):
            raise ConfigError(f"unknown model.predictor.pool '{pool}'; use all or query")
        if query_tokens not in ("learned", "text"):
            raise ConfigError(f"unknown model.predictor.query_tokens '{query_tokens}'; use learned or text")
        if query_tokens == "text" and not text_hidden_size:
            raise ConfigError("model.predictor.query_tokens=text reads the Y-encoder's token states, which this "
                              "text tower does not expose; use model.predictor.query_tokens=learned")
        self.pool, self.query_tokens, self.frames = pool, query_tokens, frames
        self.reads_query_states = query_tokens == "text"
        self.max_query_len, self.max_visual_tokens = max_query_len, max_visual_tokens
        self.visual_in = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, dim))
        self.visual_pos = nn.Parameter(torch.zeros(1, max_visual_tokens, dim))
        if query_tokens == "learned":
            self.query_embed = nn.Embedding(vocab_size, dim)
        else:
            self.query_in = nn.Sequential(nn.LayerNorm(text_hidden_size), nn.Linear(text_hidden_size, dim))
        self.query_pos = nn.Parameter(torch.zeros(1, max_query_len, dim))
        self.type_embed = nn.Parameter(torch.zeros(2, dim))  # 0 = visual, 1 = query
        # Query tokens start at the scale of the visual tokens (which leave visual_in at O(1)): word
        # embeddings at init scale 0.02 would be drowned by the first attention over the image.
        self.query_norm = nn.LayerNorm(dim)
        for p in (self.visual_pos, self.query_pos, self.type_embed):
            nn.init.trunc_normal_(p, std=0.02)
        if query_tokens == "learned":
            nn.init.normal_(self.query_embed.weight, std=0.02)
        self.blocks = nn.ModuleList(
            Block(dim=dim, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout, mlp=mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, target_dim)

    @classmethod
    def from_config(cls, cfg: PredictorConfig, *, visual_dim: int, num_visual_tokens: int, target_dim: int,
                    text_vocab_size: int,
                    text_hidden_size: int | None, load_weights: bool = True, source: str | None = None,
                    with_tokenizer: bool = True, num_frames: int = 1) -> TransformerPredictor:
        """Trained from scratch: nothing pretrained to load, no tokenizer of its own."""
        if num_visual_tokens > cfg.max_visual_tokens:
            raise ConfigError(f"the X-encoder gives {num_visual_tokens} tokens per sample; set "
                              f"model.predictor.max_visual_tokens >= {num_visual_tokens}")
        return cls(visual_dim=visual_dim, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, target_dim=target_dim,
                   vocab_size=text_vocab_size, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout,
                   max_query_len=cfg.max_query_len, max_visual_tokens=cfg.max_visual_tokens, mlp=cfg.mlp,
                   pool=cfg.pool, query_tokens=cfg.query_tokens, text_hidden_size=text_hidden_size,
                   frames=num_frames)

    def forward(self, visual_tokens: torch.Tensor, query_ids: torch.Tensor | None = None,
                query_mask: torch.Tensor | None = None, query_states: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = visual_tokens.shape
        x = self.embed_visual(visual_tokens)
        mask = None
        if query_ids is not None and query_ids.shape[1] > 0:
            x = torch.cat([x, self.embed_query(query_ids, query_states)], dim=1)
            query_mask = torch.ones_like(query_ids) if query_mask is None else query_mask
            mask = torch.cat([torch.ones(b, n, dtype=torch.bool, device=x.device), query_mask.bool()], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(masked_mean(self.norm(x), self.readout_mask(mask, n)))  # [B, target_dim]

    def embed_visual(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``[B, N, Dv]`` -> ``[B, N, dim]`` with learned positions and fixed ones: the 2-D grid
        of each frame, plus the frame's index for video."""
        n = visual_tokens.shape[1]
        if n > self.max_visual_tokens:
            raise ConfigError(f"{n} visual tokens exceed model.predictor.max_visual_tokens={self.max_visual_tokens}")
        x = self.visual_in(visual_tokens) + self.visual_pos[:, :n] + self.type_embed[0]
        fixed = visual_position_encoding(n, self.frames, x.shape[-1])
        return x if fixed is None else x + fixed.to(device=x.device, dtype=x.dtype)

    def embed_query(self, query_ids: torch.Tensor, query_states: torch.Tensor | None) -> torch.Tensor:
        """Query ids ``[B, L]`` (and Y's token states ``[B, L, H]`` for ``query_tokens=text``) -> ``[B, L, dim]``."""
        length = query_ids.shape[1]
        if length > self.max_query_len:
            raise ConfigError(f"query of {length} tokens exceeds model.predictor.max_query_len={self.max_query_len}")
        if self.query_tokens == "learned":
            words = self.query_embed(query_ids)
        else:
            if query_states is None or query_states.shape[:2] != query_ids.shape:
                raise ValueError("model.predictor.query_tokens=text needs query_states [B, L, H] matching query_ids; "
                                 "VLJepa.predict reads them from the Y-encoder")
            words = self.query_in(query_states.to(self.query_pos.dtype))
        return self.query_norm(words + self.query_pos[:, :length] + self.type_embed[1])

    def readout_mask(self, mask: torch.Tensor | None, n_visual: int) -> torch.Tensor | None:
        """Which output tokens the prediction averages: all real tokens, or (``pool=query``) the query
        tokens of rows that have a query and the visual tokens of rows that have none."""
        if self.pool == "all" or mask is None:
            return mask
        read = mask.clone()
        read[mask[:, n_visual:].any(1), :n_visual] = False
        return read
