"""Target heads: the Y-encoder's output -> the shared space the predictor predicts into."""

from __future__ import annotations

import torch
from torch import nn

from vljepa.config import ConfigError
from vljepa.models.layers import Block, masked_mean


class TargetHead(nn.Module):
    """``linear`` and ``mlp`` read the pooled sentence embedding; ``token`` reads the token states
    through a small transformer and a masked mean; ``hybrid`` is ``token`` plus a linear map of the
    pooled embedding."""

    def __init__(self, *, kind: str, pooled_dim: int, states_dim: int | None, embed_dim: int, hidden: int,
                 depth: int) -> None:
        super().__init__()
        self.kind = kind
        if kind not in ("linear", "mlp", "token", "hybrid"):
            raise ConfigError(f"unknown model.target_head '{kind}'; use linear, mlp, token or hybrid")
        if kind in ("token", "hybrid") and not states_dim:
            raise ConfigError(f"model.target_head={kind} reads the Y-encoder's token states, which this text tower "
                              "does not expose; use model.target_head=linear or mlp")
        if kind == "linear":
            self.net = nn.Linear(pooled_dim, embed_dim)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(pooled_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        else:
            self.inp = nn.Linear(states_dim, hidden)
            self.blocks = nn.ModuleList(Block(dim=hidden, heads=max(1, hidden // 64), mlp_ratio=2.0)
                                        for _ in range(depth))
            self.norm = nn.LayerNorm(hidden)
            self.out = nn.Linear(hidden, embed_dim)
            if kind == "hybrid":
                self.skip = nn.Linear(pooled_dim, embed_dim)

    @property
    def reads_states(self) -> bool:
        return self.kind in ("token", "hybrid")

    def forward(self, pooled: torch.Tensor | None, states: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """pooled ``[B, H]``; states ``[B, T, Hs]`` and mask ``[B, T]`` for the token path -> ``[B, embed_dim]``."""
        if not self.reads_states:
            return self.net(pooled)
        x = self.inp(states)
        key_mask = None if mask is None else mask.bool()
        for block in self.blocks:
            x = block(x, key_mask)
        z = self.out(masked_mean(self.norm(x), key_mask))
        return z + self.skip(pooled) if self.kind == "hybrid" else z
