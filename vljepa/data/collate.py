"""Training examples and batching.

An example is (image, query, target choices). Targets are indices into one table of unique texts
(captions or answers), so the same text is the same target everywhere: its index is the
``target_groups`` id InfoNCE uses to avoid treating repeated answers as negatives. Caption
examples have several targets; each epoch picks one, deterministically from (seed, epoch, index).

Batch keys (shapes): ``visual_tokens`` [B, N, Dv] (cached frozen X) or ``pixel_values``
[B, 3, H, W]; ``query_ids`` / ``query_mask`` [B, L] (absent when every query is empty);
``target_pooled`` [B, H] and optionally ``target_states`` [B, T, H] / ``target_mask`` [B, T]
(cached frozen Y), or ``target_ids`` / ``target_mask`` [B, T] (Y runs in the step);
``target_groups`` [B]; ``query_states`` [B, L, H] when the Collator has a table of the queries'
Y-encoder token states (a predictor that reads them, frozen Y).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset


@dataclass
class Examples:
    image: list[int]  # index into the image table
    query: list[list[int]]  # query token ids (empty list = query-free)
    targets: list[tuple[int, ...]]  # candidate target text indices (one is drawn per epoch)
    query_row: list[int] | None = None  # row of each query in the Collator's query_table (0 = no query)

    def __len__(self) -> int:
        return len(self.image)


class ExampleIndex(Dataset):
    """A dataset of example indices; the collator does the gathering in one batched step."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def pad_ids(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ids / mask ``[B, L]``."""
    length = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_flat(states: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of flat per-token ``states`` ``[sum of lengths, H]`` (row ``i`` spans ``offsets[i]`` to
    ``offsets[i + 1]``), right-padded to ``width`` (default: the longest): states ``[B, T, H]``, mask ``[B, T]``."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    t = int(lengths.max()) if width is None else width
    out = states.new_zeros((len(rows), t, states.shape[1]))
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for row, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        out[row, :n] = states[s : s + n]
        mask[row, :n] = 1
    return out, mask


class TextTable:
    """Target texts as cached Y outputs (pooled, optional flat token states) or as token ids."""

    def __init__(
        self,
        *,
        pooled: torch.Tensor | None = None,
        states: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
        token_ids: list[list[int]] | None = None,
    ) -> None:
        if pooled is None and token_ids is None:
            raise ValueError("TextTable needs cached features (pooled) or token_ids")
        self.pooled, self.states, self.offsets, self.token_ids = pooled, states, offsets, token_ids

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.pooled is None:
            ids, mask = pad_ids([self.token_ids[i] for i in idx.tolist()])
            return {"target_ids": ids, "target_mask": mask}
        out = {"target_pooled": self.pooled[idx]}
        if self.states is not None:
            out["target_states"], out["target_mask"] = pad_flat(self.states, self.offsets, idx)
        return out


class Collator:
    """Turns a list of example indices into a batch dict (see the module docstring)."""

    def __init__(
        self,
        examples: Examples,
        texts: TextTable,
        *,
        visual_tokens: torch.Tensor | None = None,
        load_pixels: Callable[[int], torch.Tensor] | None = None,
        query_table: TextTable | None = None,
        seed: int = 0,
    ) -> None:
        if (visual_tokens is None) == (load_pixels is None):
            raise ValueError("Collator needs exactly one of visual_tokens (cached) or load_pixels")
        self.examples, self.texts = examples, texts
        if query_table is not None and (examples.query_row is None or query_table.states is None):
            raise ValueError("a query_table needs token states and examples with query_row")
        self.visual_tokens, self.load_pixels, self.query_table = visual_tokens, load_pixels, query_table
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def choose_target(self, i: int) -> int:
        choices = self.examples.targets[i]
        if len(choices) == 1:
            return choices[0]
        return choices[random.Random(self.seed * 1_000_003 + self.epoch * 7_919 + i).randrange(len(choices))]

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        ex = self.examples
        images = torch.tensor([ex.image[i] for i in indices], dtype=torch.long)
        batch: dict[str, torch.Tensor] = {}
        if self.visual_tokens is not None:
            batch["visual_tokens"] = self.visual_tokens[images]
        else:
            batch["pixel_values"] = torch.stack([self.load_pixels(int(j)) for j in images])
        queries = [ex.query[i] for i in indices]
        if any(queries):
            batch["query_ids"], batch["query_mask"] = pad_ids(queries)
            if self.query_table is not None:
                rows = torch.tensor([ex.query_row[i] for i in indices], dtype=torch.long)
                batch["query_states"], _ = pad_flat(self.query_table.states, self.query_table.offsets, rows,
                                                    width=batch["query_ids"].shape[1])
        targets = torch.tensor([self.choose_target(i) for i in indices], dtype=torch.long)
        batch.update(self.texts.batch(targets))
        batch["target_groups"] = targets
        return batch
