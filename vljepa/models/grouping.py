"""Running a batch of padded sequences in groups of similar length.

A padded batch costs ``rows x (base + longest row)`` tokens. A batch that mixes captions (about 30
tokens) with one-word answers (3), or query-free rows with questions, pays mostly for padding.
Splitting it into a few groups of similar length, running each group padded only to its own
longest row and stitching the outputs back into the original order gives the same result
without the padding. ``VLJepa`` runs its predictor and target head this way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def prefix_lengths(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per-row lengths of a right-padded ``mask`` ``[B, L]``; None when it is not right-padded (or None)."""
    if mask is None:
        return None
    lengths = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    return lengths if torch.equal(prefix, mask.bool()) else None


def length_groups(lengths: torch.Tensor, *, base: int = 0, max_groups: int = 4,
                  overhead: int = 64) -> list[tuple[torch.Tensor, int]]:
    """Split rows into at most ``max_groups`` groups of similar length: ``[(row indices, max length)]``.

    The split minimises padded tokens plus ``overhead`` tokens per extra group (an exact dynamic
    programme over the distinct lengths, which are few). One group means: run the batch as it is.
    """
    values, counts = torch.unique(lengths.cpu(), return_counts=True)
    v, c = values.tolist(), counts.tolist()
    m = len(v)
    if m <= 1 or max_groups <= 1:
        return [(torch.arange(lengths.shape[0], device=lengths.device), int(v[-1]) if v else 0)]
    prefix = [0]
    for n in c:
        prefix.append(prefix[-1] + n)

    def cost(i: int, j: int) -> int:  # rows with the i-th .. j-th distinct length, padded to v[j]
        return (prefix[j + 1] - prefix[i]) * (base + v[j]) + overhead

    # best[k][j]: cheapest split of the first j+1 distinct lengths into k+1 groups; cut[k][j]: start of the last.
    inf = float("inf")
    best = [[inf] * m for _ in range(max_groups)]
    cut = [[0] * m for _ in range(max_groups)]
    for j in range(m):
        best[0][j] = cost(0, j)
    for k in range(1, max_groups):
        for j in range(k, m):
            for i in range(k, j + 1):
                total = best[k - 1][i - 1] + cost(i, j)
                if total < best[k][j]:
                    best[k][j], cut[k][j] = total, i
    k = min(range(max_groups), key=lambda kk: best[kk][m - 1])
    bounds, j = [], m - 1
    while k > 0:
        i = cut[k][j]
        bounds.append((i, j))
        j, k = i - 1, k - 1
    bounds.append((0, j))
    return [(torch.nonzero((lengths >= v[i]) & (lengths <= v[j])).flatten(), int(v[j])) for i, j in reversed(bounds)]


def run_grouped(mask: torch.Tensor | None, run: Callable[[torch.Tensor | slice, int], torch.Tensor], *,
                base: int = 0, max_groups: int = 4) -> torch.Tensor:
    """``run(rows, length)`` on groups of rows of similar length (``mask`` ``[B, L]``, right-padded),
    stitched back into the rows' original order.

    A single group, a mask that is not right-padded or ``max_groups=1`` run the whole batch as
    ``run(slice(None), L)``.
    """
    lengths = prefix_lengths(mask) if max_groups > 1 else None
    if lengths is None:
        return run(slice(None), 0 if mask is None else mask.shape[1])
    groups = length_groups(lengths, base=base, max_groups=max_groups)
    if len(groups) == 1:
        return run(slice(None), groups[0][1])
    outs = [run(rows, length) for rows, length in groups]
    order = torch.cat([rows for rows, _ in groups])
    return torch.cat(outs)[torch.argsort(order)]
