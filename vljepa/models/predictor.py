"""The predictor: a bidirectional transformer over ``[visual tokens ; query tokens]``.

It reads the X-encoder's tokens and the tokenised query, attends without a causal mask, mean-pools
the real (unpadded) tokens and projects into the shared space, predicting the embedding of the
answer. Query-free pretraining on captions passes no query at all.

Two kinds, chosen by ``model.predictor.kind`` through ``PREDICTORS``:

- ``transformer``: a small transformer trained from scratch; queries use the Y-encoder's tokenizer.
- ``hf_lm``: the last ``num_layers`` decoder layers of a pretrained causal language model (Llama,
  Qwen2/3, Gemma/Gemma2/Gemma3 families), as in the paper (the last 8 layers of Llama-3.2-1B), with that
  model's tokenizer, input token embeddings, rotary position embeddings and final norm. Its causal
  mask is replaced by a padding-only mask, so attention is bidirectional.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vljepa.config import ConfigError, PredictorConfig


class SwiGLU(nn.Module):
    """``W3 (silu(W1 x) * W2 x)``: the product of two projections of a token makes "does the
    retrieved colour equal the asked one" a bilinear function the layer computes directly."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class QueryMatch(nn.Module):
    """A match branch beside the transformer: for every image token, the product of its features with
    the query's words, read by a small per-token MLP and averaged over the image.

    ``mean_i W_o GELU(W_c ((W_v LN(v_i) + p_i) * q))`` with ``v_i`` the X-encoder's token, ``p_i`` its
    position and ``q`` the mean of the query's normalised, projected word vectors. A product of what is
    in the image and what the query names is the first-order signal a yes/no question carries ("is
    there a red circle?": red-ness of a token times "red" in the query); the per-token MLP can require
    two matches in one token (a red *and* circular object), and the mean says whether any token did.
    Measured on the built-in world (yes/no questions only, a binary loss, from a stage-1 model): the
    transformer alone stayed at chance for 500 steps; with this branch exist / yes-no reached 0.75 /
    0.76 by step 200.
    """

    def __init__(self, *, visual_dim: int, word_dim: int, rank: int, out_dim: int, max_visual_tokens: int) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, rank))
        self.pos = nn.Parameter(torch.randn(1, max_visual_tokens, rank))
        self.word = nn.Sequential(nn.LayerNorm(word_dim), nn.Linear(word_dim, rank))
        self.mix = nn.Linear(rank, rank)
        self.out = nn.Linear(rank, out_dim)

    def forward(self, visual_tokens: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """visual_tokens ``[B, N, Dv]``, words ``[B, L, Dw]``, word_mask ``[B, L]`` -> ``[B, out_dim]``;
        zero for a row without query words."""
        n = visual_tokens.shape[1]
        q = masked_mean(self.word(words), word_mask)  # [B, rank]
        v = self.visual(visual_tokens) + self.pos[:, :n].to(visual_tokens.dtype)
        h = F.gelu(self.mix(v * q[:, None])).mean(1)
        return self.out(h) * (word_mask.sum(1, keepdim=True) > 0).to(h.dtype)


class PointerGeometry(nn.Module):
    """Where the words of a question point, and in which order the question names them.

    Every query token ``l`` points at the image with each of ``pointers`` heads: a softmax over the
    output image tokens of a dot product of projections of the two states, and ``xy_lp`` the expected
    grid coordinates ``(x, y)`` under it. A weight ``a_lp`` (a projection of the token) says how much
    the token counts as a thing named. Each head then sums, over ordered pairs of tokens ``l < m``,
    ``a_lp a_mp (xy_mp - xy_lp)``: where the later-named thing lies from the earlier-named one. Those
    offsets, through a linear map gated by a projection of the question (the mean of its tokens), are
    added to the pooled state. "Is the red circle left of the blue star?" is then ``x_star -
    x_circle`` (one offset) times "left" (one gate): a product of two projections. The transformer
    alone would have to bring both positions into one token and sign each by its noun's role and by
    the relation word; on the built-in world that stayed at chance in every stage-2 run.
    """

    def __init__(self, *, dim: int, pointers: int, rank: int) -> None:
        super().__init__()
        self.pointers, self.rank = pointers, rank
        self.key = nn.Linear(dim, pointers * rank)
        self.query = nn.Linear(dim, pointers * rank)
        self.weight = nn.Linear(dim, pointers)
        self.geometry = nn.Linear(2 * pointers, rank)
        self.gate = nn.Linear(dim, rank)
        self.out = nn.Linear(rank, dim)

    def forward(self, image: torch.Tensor, coords: torch.Tensor, words: torch.Tensor,
                word_mask: torch.Tensor) -> torch.Tensor:
        """image ``[B, N, D]``, coords ``[N, 2]``, words ``[B, L, D]``, word_mask ``[B, L]`` -> ``[B, D]``;
        zero for a row without query words."""
        b, n, _ = image.shape
        length = words.shape[1]
        keys = self.key(image).view(b, n, self.pointers, self.rank)
        queries = self.query(words).view(b, length, self.pointers, self.rank)
        scores = torch.einsum("blpr,bnpr->blpn", queries, keys) * self.rank ** -0.5
        where = torch.softmax(scores, dim=-1) @ coords  # [B, L, P, 2]
        a = self.weight(words) * word_mask[..., None].to(words.dtype)  # [B, L, P]
        # sum over l < m of a_l a_m (xy_m - xy_l) = sum_l a_l xy_l (sum_{m<l} a_m - sum_{m>l} a_m)
        before = a.cumsum(1) - a
        after = a.sum(1, keepdim=True) - a.cumsum(1)
        offsets = ((a * (before - after))[..., None] * where).sum(1)  # [B, P, 2]
        question = masked_mean(words, word_mask)
        has_query = (word_mask.sum(1, keepdim=True) > 0).to(words.dtype)
        return has_query * self.out(self.geometry(offsets.reshape(b, 2 * self.pointers)) * self.gate(question))


class Block(nn.Module):
    """Pre-norm transformer block with bidirectional attention and a key padding mask.

    ``mlp``: ``gelu`` (two layers, ``mlp_ratio * dim`` hidden) or ``swiglu`` (gated, with 2/3 of
    that hidden width, so both have about the same parameters and cost).
    """

    def __init__(self, *, dim: int, heads: int, mlp_ratio: float, dropout: float, mlp: str = "gelu") -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"predictor dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        if mlp == "gelu":
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        elif mlp == "swiglu":
            self.mlp = SwiGLU(dim, max(1, 2 * hidden // 3))
        else:
            raise ConfigError(f"unknown model.predictor.mlp '{mlp}'; use gelu or swiglu")
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


@functools.lru_cache(maxsize=16)
def grid_position_encoding(n: int, dim: int) -> torch.Tensor | None:
    """Fixed 2-D sine-cosine positions ``[n, dim]`` for a square grid of ``n`` tokens in raster order.

    Added on top of the learned positions so that where a token sits is readable from the first
    step: relations ("left of", "above") are decided by it. None when ``n`` is not a square.
    """
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
def grid_coordinates(n: int) -> torch.Tensor | None:
    """``[n, 2]`` (x, y) in [-1, 1] of a square grid of ``n`` tokens in raster order; None if not square."""
    side = math.isqrt(n)
    if side * side != n:
        return None
    axis = torch.linspace(-1.0, 1.0, side) if side > 1 else torch.zeros(1)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of ``x`` ``[B, N, D]`` counting only positions where ``mask`` is true."""
    if mask is None:
        return x.mean(1)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def prefix_lengths(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per-row lengths of a right-padded ``mask`` ``[B, L]``; None when it is not right-padded (or None)."""
    if mask is None:
        return None
    lengths = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    return lengths if torch.equal(prefix, mask.bool()) else None


def length_buckets(lengths: torch.Tensor, *, base: int = 0, max_buckets: int = 4,
                   overhead: int = 64) -> list[tuple[torch.Tensor, int]]:
    """Split rows into at most ``max_buckets`` groups of similar length: ``[(row indices, max length)]``.

    A padded batch costs ``rows x (base + longest row)`` tokens; a batch that mixes captions (30
    tokens) with one-word answers (3) or query-free rows with questions pays mostly for padding.
    The split minimises padded tokens plus ``overhead`` tokens per extra group (exact dynamic
    programme over the distinct lengths, which are few). One group means: run the batch as it is.
    """
    values, counts = torch.unique(lengths.cpu(), return_counts=True)
    v, c = values.tolist(), counts.tolist()
    m = len(v)
    if m <= 1 or max_buckets <= 1:
        return [(torch.arange(lengths.shape[0], device=lengths.device), int(v[-1]) if v else 0)]
    prefix = [0]
    for n in c:
        prefix.append(prefix[-1] + n)

    def cost(i: int, j: int) -> int:  # rows with the i-th .. j-th distinct length, padded to v[j]
        return (prefix[j + 1] - prefix[i]) * (base + v[j]) + overhead

    # best[k][j]: cheapest split of the first j+1 distinct lengths into k+1 groups; cut[k][j]: start of the last.
    inf = float("inf")
    best = [[inf] * m for _ in range(max_buckets)]
    cut = [[0] * m for _ in range(max_buckets)]
    for j in range(m):
        best[0][j] = cost(0, j)
    for k in range(1, max_buckets):
        for j in range(k, m):
            for i in range(k, j + 1):
                total = best[k - 1][i - 1] + cost(i, j)
                if total < best[k][j]:
                    best[k][j], cut[k][j] = total, i
    k = min(range(max_buckets), key=lambda kk: best[kk][m - 1])
    bounds, j = [], m - 1
    while k > 0:
        i = cut[k][j]
        bounds.append((i, j))
        j, k = i - 1, k - 1
    bounds.append((0, j))
    groups = []
    for i, j in reversed(bounds):
        rows = torch.nonzero((lengths >= v[i]) & (lengths <= v[j])).flatten()
        groups.append((rows, int(v[j])))
    return groups


def run_in_buckets(groups: list[tuple[torch.Tensor, int]], run) -> torch.Tensor:
    """``run(rows, length)`` for each group, stitched back into the rows' original order; a single
    group runs as ``run(slice(None), length)`` (all rows, no gather)."""
    if len(groups) == 1:
        return run(slice(None), groups[0][1])
    outs = [run(rows, length) for rows, length in groups]
    order = torch.cat([rows for rows, _ in groups])
    return torch.cat(outs)[torch.argsort(order)]


class Predictor(nn.Module):
    """Predicts the answer embedding ``[B, target_dim]`` from visual tokens and a query.

    A batch whose queries differ in length (captions without a query beside questions) is run in a
    few groups of similar length (``max_length_buckets``; 1 = one padded batch): the same result,
    without computing on padding.
    """

    max_length_buckets = 4

    tokenizer = None  # queries are tokenised with the Y-encoder's tokenizer

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
        registers: int = 0,
        mlp: str = "gelu",
        pool: str = "all",
        query_tokens: str = "learned",
        text_state_dim: int | None = None,
        text_word_dim: int | None = None,
        fusion: str = "none",
        fusion_rank: int = 0,
        pointers: int = 4,
    ) -> None:
        super().__init__()
        if fusion not in ("none", "match", "pointer"):
            raise ConfigError(f"unknown model.predictor.fusion '{fusion}'; use none, match or pointer")
        if fusion_rank < 0:
            raise ConfigError(f"model.predictor.fusion_rank={fusion_rank} must be >= 0 (0 = the predictor's dim)")
        if fusion == "pointer" and pointers < 1:
            raise ConfigError(f"model.predictor.pointers={pointers} must be >= 1 with fusion=pointer")
        if query_tokens not in ("learned", "text", "words"):
            raise ConfigError(f"unknown model.predictor.query_tokens '{query_tokens}'; use learned, text or words")
        if query_tokens == "text" and not text_state_dim:
            raise ConfigError("model.predictor.query_tokens=text reads the Y-encoder's token states, which this "
                              "text tower does not expose; use model.predictor.query_tokens=learned")
        if query_tokens == "words" and not text_word_dim:
            raise ConfigError("model.predictor.query_tokens=words reads the Y-encoder's input word embeddings, which "
                              "this text tower does not expose; use model.predictor.query_tokens=learned")
        self.query_tokens = query_tokens
        if pool not in ("all", "query"):
            raise ConfigError(f"unknown model.predictor.pool '{pool}'; use all or query")
        self.pool = pool
        if registers < 0:
            raise ConfigError(f"model.predictor.registers={registers} must be >= 0")
        self.max_query_len = max_query_len
        self.max_visual_tokens = max_visual_tokens
        self.visual_in = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, dim))
        # Position matters: relations ("left of") are read off where a token sits in the grid.
        self.visual_pos = nn.Parameter(torch.zeros(1, max_visual_tokens, dim))
        if query_tokens in ("learned", "words"):
            self.query_embed = nn.Embedding(vocab_size, dim)
        if query_tokens != "learned":
            width = text_state_dim if query_tokens == "text" else text_word_dim
            self.query_in = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.query_pos = nn.Parameter(torch.zeros(1, max_query_len, dim))
        self.type_embed = nn.Parameter(torch.zeros(2, dim))  # 0 = visual, 1 = query
        # Query tokens start at the scale of the visual tokens (which leave visual_in at O(1)): word
        # embeddings at init scale 0.02 would be drowned by the first attention over the image, and
        # the predictor could not tell "is there a red circle?" from "is there a blue star?".
        self.query_norm = nn.LayerNorm(dim)
        self.registers = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        for p in (self.visual_pos, self.query_pos, self.type_embed, *([self.registers] if registers else [])):
            nn.init.trunc_normal_(p, std=0.02)
        if query_tokens == "learned":  # initialised here, as before the option existed: same seed, same model
            nn.init.normal_(self.query_embed.weight, std=0.02)
        elif query_tokens == "words":  # per-word offsets start at zero: every word starts as Y embeds it
            nn.init.zeros_(self.query_embed.weight)
        self.blocks = nn.ModuleList(
            Block(dim=dim, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout, mlp=mlp) for _ in range(depth)
        )
        self.match = None
        if fusion == "match":
            self.match = QueryMatch(visual_dim=visual_dim, word_dim=dim, rank=fusion_rank or dim, out_dim=dim,
                                    max_visual_tokens=max_visual_tokens)
        self.pointer = (PointerGeometry(dim=dim, pointers=pointers, rank=fusion_rank or dim // 4)
                        if fusion == "pointer" else None)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, target_dim)

    @classmethod
    def from_config(cls, cfg: PredictorConfig, *, visual_dim: int, target_dim: int, vocab_size: int,
                    load_weights: bool = True, source: str | None = None, with_tokenizer: bool = True,
                    text_state_dim: int | None = None, text_word_dim: int | None = None) -> Predictor:
        """Trained from scratch: nothing pretrained to load, no tokenizer of its own."""
        return cls(
            visual_dim=visual_dim, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, target_dim=target_dim,
            vocab_size=vocab_size, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout,
            max_query_len=cfg.max_query_len, max_visual_tokens=cfg.max_visual_tokens, registers=cfg.registers,
            mlp=cfg.mlp, pool=cfg.pool, query_tokens=cfg.query_tokens, text_state_dim=text_state_dim,
            text_word_dim=text_word_dim,
            fusion=cfg.fusion, fusion_rank=cfg.fusion_rank, pointers=cfg.pointers,
        )

    def forward(
        self,
        visual_tokens: torch.Tensor,
        query_ids: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        query_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """visual_tokens ``[B, N, Dv]``; query_ids / query_mask ``[B, L]`` or None (query-free);
        ``query_states`` ``[B, L, H]``: the Y-encoder's token states of the query (``query_tokens=text``) or
        its input word embeddings (``query_tokens=words``)."""
        lengths = None
        if query_ids is not None and query_ids.shape[1] > 0 and self.max_length_buckets > 1 and (
            query_states is None or query_states.shape[:2] == query_ids.shape
        ):
            lengths = prefix_lengths(torch.ones_like(query_ids) if query_mask is None else query_mask)
        if lengths is None:
            return self._forward(visual_tokens, query_ids, query_mask, query_states)
        n_registers = 0 if self.registers is None else self.registers.shape[1]
        groups = length_buckets(lengths, base=visual_tokens.shape[1] + n_registers,
                                max_buckets=self.max_length_buckets)

        def run(rows: torch.Tensor | slice, length: int) -> torch.Tensor:
            if length == 0:  # query-free rows (captions in a mixed batch)
                return self._forward(visual_tokens[rows])
            qs = None if query_states is None else query_states[rows, :length]
            qm = None if query_mask is None else query_mask[rows, :length]
            return self._forward(visual_tokens[rows], query_ids[rows, :length], qm, qs)

        return run_in_buckets(groups, run)

    def _forward(self, visual_tokens: torch.Tensor, query_ids: torch.Tensor | None = None,
                 query_mask: torch.Tensor | None = None, query_states: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` on one padded block of rows."""
        b, n, _ = visual_tokens.shape
        if n > self.max_visual_tokens:
            raise ConfigError(
                f"{n} visual tokens exceed model.predictor.max_visual_tokens={self.max_visual_tokens}"
            )
        x = self.visual_in(visual_tokens) + self.visual_pos[:, :n] + self.type_embed[0]
        grid = grid_position_encoding(n, x.shape[-1])
        if grid is not None:
            x = x + grid.to(device=x.device, dtype=x.dtype)
        mask = words = None
        if query_ids is not None and query_ids.shape[1] > 0:
            q_len = query_ids.shape[1]
            if q_len > self.max_query_len:
                raise ConfigError(f"query of {q_len} tokens exceeds model.predictor.max_query_len={self.max_query_len}")
            if self.query_tokens == "learned":
                words = self.query_embed(query_ids)
            else:
                if query_states is None or query_states.shape[:2] != query_ids.shape:
                    raise ValueError(f"model.predictor.query_tokens={self.query_tokens} needs query_states [B, L, H] "
                                     "matching query_ids; VLJepa.predict reads them from the Y-encoder")
                words = self.query_in(query_states.to(x.dtype))
                if self.query_tokens == "words":
                    words = words + self.query_embed(query_ids)
            q = self.query_norm(words + self.query_pos[:, :q_len] + self.type_embed[1])
            x = torch.cat([x, q], dim=1)
            if query_mask is None:
                query_mask = torch.ones_like(query_ids)
            visual_mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
            mask = torch.cat([visual_mask, query_mask.bool()], dim=1)
        n_seq = x.shape[1]
        if self.registers is not None:
            x = torch.cat([x, self.registers.expand(b, -1, -1).to(x.dtype)], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones(b, self.registers.shape[1], dtype=torch.bool, device=x.device)], 1)
        for block in self.blocks:
            x = block(x, mask)
        # Registers are attended to but not read out: the pooled state is over image and query tokens.
        x, mask = x[:, :n_seq], None if mask is None else mask[:, :n_seq]
        if self.pool == "query" and mask is not None:
            # Read the answer off the query tokens; a row without a query (a caption in a mixed batch)
            # is read off its visual tokens.
            read = mask.clone()
            has_query = mask[:, n:].any(1)
            read[has_query, :n] = False
            mask = read
        x = self.norm(x)
        pooled = masked_mean(x, mask)
        if self.pointer is not None and words is not None:
            coords = grid_coordinates(n)
            if coords is None:
                raise ConfigError(f"model.predictor.fusion=pointer needs a square grid of visual tokens; got {n}")
            # A query-free row of a mixed batch (all-padding query) gets zero from the branch.
            pooled = pooled + self.pointer(x[:, :n], coords.to(device=x.device, dtype=x.dtype), x[:, n:], query_mask)
        if self.match is not None and words is not None:
            pooled = pooled + self.match(visual_tokens.to(pooled.dtype), words, query_mask)
        return self.head(pooled)  # [B, target_dim]


class HFLMPredictor(nn.Module):
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
                self.lm = AutoModel.from_config(cut, attn_implementation=attn)
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

    @classmethod
    def from_config(cls, cfg: PredictorConfig, *, visual_dim: int, target_dim: int, vocab_size: int,
                    load_weights: bool = True, source: str | None = None,
                    with_tokenizer: bool = True) -> HFLMPredictor:
        """``vocab_size`` is unused (the LM has its own); ``source`` is a saved model's ``predictor/`` folder."""
        if source is None and not cfg.path:
            raise ConfigError("model.predictor.kind=hf_lm needs model.predictor.path: a causal language model "
                              "folder or Hub id, e.g. meta-llama/Llama-3.2-1B")
        # A saved model's folder holds the config of the K kept layers only.
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

    def forward(
        self,
        visual_tokens: torch.Tensor,
        query_ids: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
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


PREDICTORS: dict[str, type[nn.Module]] = {"transformer": Predictor, "hf_lm": HFLMPredictor}


# PredictorConfig fields only the built-in transformer reads (hf_lm embeds queries with its own LM).
TRANSFORMER_ONLY = ("query_tokens", "registers", "mlp", "pool", "fusion", "fusion_rank", "pointers")


def build_predictor(cfg: PredictorConfig, *, visual_dim: int, target_dim: int, vocab_size: int,
                    load_weights: bool = True, source: str | None = None, with_tokenizer: bool = True,
                    text_state_dim: int | None = None, text_word_dim: int | None = None) -> nn.Module:
    """Build the predictor named by ``cfg.kind``.

    ``vocab_size`` sizes the built-in predictor's query embedding (the Y tokenizer's); ``source`` is
    a saved model's ``predictor/`` folder; ``with_tokenizer=False`` builds without a tokenizer (counting).
    """
    if cfg.kind not in PREDICTORS:
        # The built-in kind first; hf_lm needs a model path, so it is named with what it needs.
        raise ConfigError(f"unknown model.predictor.kind '{cfg.kind}'; choose one of ['transformer'] (trained from "
                          "scratch) or 'hf_lm' (the last layers of a pretrained language model, with "
                          "model.predictor.path)")
    if cfg.kind != "transformer":
        # Options of the built-in transformer only: set on another kind they would be silently ignored.
        defaults = PredictorConfig()
        for key in TRANSFORMER_ONLY:
            if getattr(cfg, key) != getattr(defaults, key):
                raise ConfigError(f"model.predictor.{key}={getattr(cfg, key)} is for the built-in transformer; "
                                  f"model.predictor.kind={cfg.kind} does not use it (leave it at "
                                  f"{getattr(defaults, key)!r})")
    extra = {"text_state_dim": text_state_dim, "text_word_dim": text_word_dim} if cfg.kind == "transformer" else {}
    return PREDICTORS[cfg.kind].from_config(cfg, visual_dim=visual_dim, target_dim=target_dim, vocab_size=vocab_size,
                                            load_weights=load_weights, source=source, with_tokenizer=with_tokenizer,
                                            **extra)
