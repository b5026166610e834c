"""Layers shared by every model: the transformer block, its MLPs, masked mean and grid positions."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from vljepa.config import ConfigError


class SwiGLU(nn.Module):
    """Gated feed-forward layer ``W_down (silu(W_gate x) * W_up x)`` (Shazeer, 2020)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def feed_forward(kind: str, dim: int, hidden: int) -> nn.Module:
    """``gelu``: two layers of ``hidden`` units; ``swiglu``: gated, with 2/3 of that width, so both
    have about the same parameters and cost."""
    if kind == "gelu":
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
    if kind == "swiglu":
        return SwiGLU(dim, max(1, 2 * hidden // 3))
    raise ConfigError(f"unknown model.predictor.mlp '{kind}'; use gelu or swiglu")


class Block(nn.Module):
    """Pre-norm transformer block with bidirectional attention and a key padding mask."""

    def __init__(self, *, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0, mlp: str = "gelu") -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"transformer width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = feed_forward(mlp, dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``[B, N, D]``; ``key_mask`` ``[B, N]`` (True = a real token) or None."""
        x = x + self._drop(self.attend(self.norm1(x), key_mask))
        return x + self._drop(self.mlp(self.norm2(x)))

    def attend(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # broadcast over heads and queries
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(a.transpose(1, 2).reshape(b, n, d))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of ``x`` ``[B, N, D]`` counting only positions where ``mask`` ``[B, N]`` is true."""
    if mask is None:
        return x.mean(1)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


@functools.lru_cache(maxsize=16)
def grid_position_encoding(n: int, dim: int) -> torch.Tensor | None:
    """Fixed 2-D sine-cosine positions ``[n, dim]`` of a square grid of ``n`` tokens in raster order
    (x in the first half of the features, y in the second); None when ``n`` is not a square."""
    side = math.isqrt(n)
    if side * side != n or dim % 4:
        return None
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1).float() * freq[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(xs), encode(ys)], dim=1)


@functools.lru_cache(maxsize=16)
def visual_position_encoding(n: int, frames: int, dim: int) -> torch.Tensor | None:
    """Fixed positions ``[n, dim]`` of ``frames`` frames' tokens in time order: each frame's 2-D grid
    (:func:`grid_position_encoding`) plus, for video, a 1-D sine-cosine of the frame index over all
    features. None when a frame's tokens do not form a square grid."""
    if n % frames:
        return None
    grid = grid_position_encoding(n // frames, dim)
    if grid is None or frames == 1:
        return grid
    half = dim // 2
    freq = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float32) / half)
    angles = torch.arange(frames, dtype=torch.float32)[:, None] * freq[None]
    time = torch.cat([angles.sin(), angles.cos()], dim=1)  # [frames, dim]
    return grid.repeat(frames, 1) + time.repeat_interleave(n // frames, dim=0)
