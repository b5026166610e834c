"""The predictor: a bidirectional transformer over ``[visual tokens ; query tokens]``.

It reads the X-encoder's tokens and the tokenised query, attends without a causal mask, mean-pools
the real (unpadded) tokens and projects into the shared space, predicting the embedding of the
answer. Query-free pretraining on captions passes no query at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vljepa.config import ConfigError, PredictorConfig


class Block(nn.Module):
    """Pre-norm transformer block with bidirectional attention and a key padding mask."""

    def __init__(self, *, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"predictor dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # key_mask [B, N] (True = real token) broadcast over heads and queries.
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        drop = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        x = x + F.dropout(self.proj(a.transpose(1, 2).reshape(b, n, d)), drop, self.training)
        return x + F.dropout(self.mlp(self.norm2(x)), drop, self.training)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of ``x`` ``[B, N, D]`` counting only positions where ``mask`` is true."""
    if mask is None:
        return x.mean(1)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class Predictor(nn.Module):
    """Predicts the answer embedding ``[B, target_dim]`` from visual tokens and a query."""

    def __init__(
        self,
        *,
        visual_dim: int,
        dim: int,
        depth: int,
        heads: int,
        target_dim: int,
        vocab_size: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        max_query_len: int = 32,
        max_visual_tokens: int = 256,
    ) -> None:
        super().__init__()
        self.max_query_len = max_query_len
        self.max_visual_tokens = max_visual_tokens
        self.visual_in = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, dim))
        # Position matters: relations ("left of") are read off where a token sits in the grid.
        self.visual_pos = nn.Parameter(torch.zeros(1, max_visual_tokens, dim))
        self.query_embed = nn.Embedding(vocab_size, dim)
        self.query_pos = nn.Parameter(torch.zeros(1, max_query_len, dim))
        self.type_embed = nn.Parameter(torch.zeros(2, dim))  # 0 = visual, 1 = query
        for p in (self.visual_pos, self.query_pos, self.type_embed):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.normal_(self.query_embed.weight, std=0.02)
        self.blocks = nn.ModuleList(
            Block(dim=dim, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, target_dim)

    @classmethod
    def from_config(cls, cfg: PredictorConfig, *, visual_dim: int, target_dim: int, vocab_size: int) -> Predictor:
        return cls(
            visual_dim=visual_dim, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, target_dim=target_dim,
            vocab_size=vocab_size, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout,
            max_query_len=cfg.max_query_len, max_visual_tokens=cfg.max_visual_tokens,
        )

    def forward(
        self,
        visual_tokens: torch.Tensor,
        query_ids: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """visual_tokens ``[B, N, Dv]``; query_ids / query_mask ``[B, L]`` or None (query-free)."""
        b, n, _ = visual_tokens.shape
        if n > self.max_visual_tokens:
            raise ConfigError(
                f"{n} visual tokens exceed model.predictor.max_visual_tokens={self.max_visual_tokens}"
            )
        x = self.visual_in(visual_tokens) + self.visual_pos[:, :n] + self.type_embed[0]
        mask = None
        if query_ids is not None and query_ids.shape[1] > 0:
            q_len = query_ids.shape[1]
            if q_len > self.max_query_len:
                raise ConfigError(f"query of {q_len} tokens exceeds model.predictor.max_query_len={self.max_query_len}")
            q = self.query_embed(query_ids) + self.query_pos[:, :q_len] + self.type_embed[1]
            x = torch.cat([x, q], dim=1)
            if query_mask is None:
                query_mask = torch.ones_like(query_ids)
            visual_mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
            mask = torch.cat([visual_mask, query_mask.bool()], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(masked_mean(self.norm(x), mask))  # [B, target_dim]


PREDICTORS = {"transformer": Predictor}


def build_predictor(cfg: PredictorConfig, *, visual_dim: int, target_dim: int, vocab_size: int) -> Predictor:
    """Build the predictor named by ``cfg.kind``."""
    if cfg.kind not in PREDICTORS:
        raise ConfigError(f"unknown model.predictor.kind '{cfg.kind}'; choose one of {sorted(PREDICTORS)}")
    return PREDICTORS[cfg.kind].from_config(cfg, visual_dim=visual_dim, target_dim=target_dim, vocab_size=vocab_size)
