"""Selective decoding: when to turn a stream of predicted embeddings into text.

A stream is ``embeddings [T, D]`` with increasing ``times [T]`` (seconds). A policy splits it into
consecutive segments and picks one row of each segment to decode; the text decoded there stands
for the whole segment. Three policies share one interface, ``policy.plan(embeddings, times) ->
DecodePlan``:

- :class:`Ward` (the VL-JEPA paper's method, offline): agglomerative clustering with Ward linkage
  over the L2-normalised embeddings, constrained to a chain graph so that clusters are runs of
  consecutive rows. The number of segments comes from a target decode rate (or a fixed count, or
  a Ward distance threshold); each segment is decoded at its middle row.
- :class:`Online` (live streams): decode when the embedding has moved more than ``threshold``
  (cosine distance) from the last decoded one, or when ``max_gap_s`` seconds have passed since the
  last decode. :class:`OnlineDecider` makes the same decision one embedding at a time.
- :class:`Uniform`: decode at a fixed rate (decodes per second), whatever the content.

For the online and uniform policies a segment starts at its decoded row; for Ward the decoded row is
the segment's middle, so the plan records both (``indices`` and ``boundaries``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class DecodePlan:
    """Where a policy decodes a stream of ``T`` embeddings into ``K`` segments.

    ``boundaries[k]:boundaries[k + 1]`` are the rows of segment ``k``; ``indices[k]`` is the row
    decoded for it. ``times`` are the decoded rows' timestamps and ``starts`` / ``ends`` the time span
    each segment covers (``ends[k] == starts[k + 1]``; the last segment ends at the last timestamp).
    """

    policy: str
    indices: np.ndarray  # [K] int64, increasing
    boundaries: np.ndarray  # [K + 1] int64, boundaries[0] = 0, boundaries[-1] = T
    times: np.ndarray  # [K] float64
    starts: np.ndarray  # [K] float64
    ends: np.ndarray  # [K] float64

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        """Segment index of every row ``[T]``."""
        return np.repeat(np.arange(len(self)), np.diff(self.boundaries))

    def segment_means(self, embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The L2-normalised mean of each segment's embeddings ``[K, D]`` (an alternative to
        decoding the row at ``indices``)."""
        z = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32), dim=-1)
        sums = torch.zeros(len(self), z.shape[1]).index_add_(0, torch.as_tensor(self.labels), z)
        return torch.nn.functional.normalize(sums, dim=-1)


class DecodePolicy(Protocol):
    """A selective-decoding policy: ``plan`` splits a finished stream into decoded segments."""

    name: str

    def plan(self, embeddings: torch.Tensor | np.ndarray, times: np.ndarray | list[float]) -> DecodePlan: ...


def _check_stream(embeddings, times) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``[T, D]`` (float64, L2-normalised) and times ``[T]`` (float64), validated."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().double().numpy()
    z = np.asarray(embeddings, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"embeddings must be [T, D], got shape {z.shape}")
    if z.shape[0] == 0:
        raise ValueError("the stream is empty: no embeddings to decode")
    if t.shape != (z.shape[0],):
        raise ValueError(f"times must be [T] = [{z.shape[0]}] to match the embeddings, got shape {t.shape}")
    if not np.isfinite(z).all() or not np.isfinite(t).all():
        raise ValueError("embeddings or times contain NaN or Inf")
    if (np.diff(t) <= 0).any():
        i = int(np.nonzero(np.diff(t) <= 0)[0][0])
        raise ValueError(f"times must increase strictly; times[{i}]={t[i]} is followed by {t[i + 1]}")
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"embedding row {int(np.nonzero(norms[:, 0] == 0)[0][0])} is all zeros (no direction)")
    return z / norms, t


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def duration(times: np.ndarray) -> float:
    """Seconds a stream covers: first to last timestamp, plus one (median) step for the last row."""
    t = np.asarray(times, dtype=np.float64)
    step = float(np.median(np.diff(t))) if len(t) > 1 else 1.0
    return float(t[-1] - t[0]) + step


def _plan(policy: str, boundaries: np.ndarray, indices: np.ndarray, times: np.ndarray) -> DecodePlan:
    """A plan from segment boundaries ``[K + 1]`` and decoded rows ``[K]``; a segment spans from its
    first row's time to the next segment's."""
    boundaries = boundaries.astype(np.int64)
    indices = indices.astype(np.int64)
    starts = times[boundaries[:-1]]
    return DecodePlan(policy=policy, indices=indices, boundaries=boundaries, times=times[indices],
                      starts=starts, ends=np.append(starts[1:], times[-1]))


@dataclass(frozen=True)
class Uniform:
    """Decode every ``1 / rate`` seconds: at the first row at or after ``times[0] + k / rate``."""

    rate: float  # decodes per second
    name: str = "uniform"

    def __post_init__(self) -> None:
        _positive("Uniform.rate", self.rate)

    def plan(self, embeddings: torch.Tensor | np.ndarray, times: np.ndarray | list[float]) -> DecodePlan:
        _, t = _check_stream(embeddings, times)
        targets = t[0] + np.arange(int(math.floor((t[-1] - t[0]) * self.rate + 1e-9)) + 1) / self.rate
        rows = np.unique(np.searchsorted(t, targets - 1e-9))
        rows = rows[rows < len(t)]
        return _plan(self.name, np.append(rows, len(t)), rows, t)


class OnlineDecider:
    """The online policy's decision for one embedding at a time (for live streams).

    ``update(time, embedding)`` returns True when this embedding is to be decoded: the first one,
    one whose cosine distance to the last decoded embedding exceeds ``threshold``, or one at least
    ``max_gap_s`` seconds after the last decode (None: no limit).
    """

    def __init__(self, threshold: float, max_gap_s: float | None = None) -> None:
        if not (math.isfinite(threshold) and 0 <= threshold <= 2):
            raise ValueError(f"online threshold is a cosine distance in [0, 2], got {threshold!r}")
        if max_gap_s is not None:
            _positive("online max_gap_s", max_gap_s)
        self.threshold = float(threshold)
        self.max_gap_s = max_gap_s
        self._last: np.ndarray | None = None
        self._last_time = -math.inf

    def distance(self, embedding: torch.Tensor | np.ndarray) -> float:
        """Cosine distance of ``embedding [D]`` to the last decoded embedding (inf before the first)."""
        if self._last is None:
            return math.inf
        return float(1.0 - self._last @ _unit(embedding))

    def update(self, time: float, embedding: torch.Tensor | np.ndarray) -> bool:
        """Whether to decode ``embedding`` (seen at ``time`` seconds); remembers it if so."""
        if time <= self._last_time:
            raise ValueError(f"online decoding needs increasing times; got {time} after {self._last_time}")
        gap = self.max_gap_s is not None and time - self._last_time >= self.max_gap_s - 1e-9
        if self._last is None or gap or self.distance(embedding) > self.threshold:
            self._last, self._last_time = _unit(embedding), float(time)
            return True
        return False


def _unit(embedding: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(embedding, torch.Tensor):
        embedding = embedding.detach().cpu().double().numpy()
    v = np.asarray(embedding, dtype=np.float64).reshape(-1)
    norm = np.linalg.norm(v)
    if not np.isfinite(v).all() or norm == 0:
        raise ValueError("an embedding of the stream is all zeros or not finite")
    return v / norm


@dataclass(frozen=True)
class Online:
    """Decode when the embedding moves: see :class:`OnlineDecider`."""

    threshold: float  # cosine distance to the last decoded embedding that triggers a decode
    max_gap_s: float | None = None  # decode at least this often (seconds); None = only on change
    name: str = "online"

    def __post_init__(self) -> None:
        OnlineDecider(self.threshold, self.max_gap_s)  # validates the parameters

    def decider(self) -> OnlineDecider:
        """A fresh live decider with this policy's parameters."""
        return OnlineDecider(self.threshold, self.max_gap_s)

    def plan(self, embeddings: torch.Tensor | np.ndarray, times: np.ndarray | list[float]) -> DecodePlan:
        z, t = _check_stream(embeddings, times)
        decider = self.decider()
        rows = np.array([i for i in range(len(t)) if decider.update(t[i], z[i])], dtype=np.int64)
        return _plan(self.name, np.append(rows, len(t)), rows, t)


@dataclass(frozen=True)
class Ward:
    """Agglomerative clustering with Ward linkage over consecutive rows; one decode per segment, at
    its middle row (the earlier of two middles).

    Give exactly one of ``rate`` (decodes per second: ``round(rate * duration)`` segments),
    ``n_segments``, or ``distance_threshold`` (stop merging at this Ward linkage distance, on
    L2-normalised embeddings).
    """

    rate: float | None = None
    n_segments: int | None = None
    distance_threshold: float | None = None
    name: str = "ward"

    def __post_init__(self) -> None:
        given = [k for k in ("rate", "n_segments", "distance_threshold") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"Ward needs exactly one of rate, n_segments or distance_threshold; got {given or 'none'}")
        if self.rate is not None:
            _positive("Ward.rate", self.rate)
        if self.distance_threshold is not None:
            _positive("Ward.distance_threshold", self.distance_threshold)
        if self.n_segments is not None and (not isinstance(self.n_segments, int) or self.n_segments < 1):
            raise ValueError(f"Ward.n_segments must be a positive integer, got {self.n_segments!r}")

    def plan(self, embeddings: torch.Tensor | np.ndarray, times: np.ndarray | list[float]) -> DecodePlan:
        z, t = _check_stream(embeddings, times)
        labels = ward_labels(z, n_segments=self._count(t), distance_threshold=self.distance_threshold)
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        boundaries = np.append(starts, len(t))
        middles = (boundaries[:-1] + boundaries[1:] - 1) // 2
        return _plan(self.name, boundaries, middles, t)

    def _count(self, times: np.ndarray) -> int | None:
        if self.n_segments is not None:
            return min(self.n_segments, len(times))
        if self.rate is not None:
            return int(min(len(times), max(1, round(self.rate * duration(times)))))
        return None


def ward_labels(embeddings: np.ndarray, *, n_segments: int | None = None,
                distance_threshold: float | None = None) -> np.ndarray:
    """Segment label ``[T]`` of each row: Ward clustering with a chain connectivity graph (row i
    linked to i - 1 and i + 1), so every cluster is a run of consecutive rows."""
    n = len(embeddings)
    if n == 1 or n_segments == 1:
        return np.zeros(n, dtype=np.int64)
    if n_segments is not None and n_segments >= n:
        return np.arange(n, dtype=np.int64)
    # Imported here: scikit-learn takes seconds to import and only Ward needs it.
    from scipy.sparse import diags
    from sklearn.cluster import AgglomerativeClustering

    chain = diags([np.ones(n - 1), np.ones(n - 1)], [-1, 1], shape=(n, n), format="csr")
    model = AgglomerativeClustering(n_clusters=n_segments, linkage="ward", connectivity=chain,
                                    distance_threshold=distance_threshold,
                                    compute_full_tree=True if distance_threshold is not None else "auto")
    labels = model.fit_predict(embeddings)
    # Renumber in time order; the chain graph makes each cluster one run of rows.
    change = np.r_[True, labels[1:] != labels[:-1]]
    return np.cumsum(change) - 1


POLICIES = ("ward", "online", "uniform")


def make_policy(name: str, *, rate: float | None = None, n_segments: int | None = None,
                distance_threshold: float | None = None, threshold: float | None = None,
                max_gap_s: float | None = None) -> DecodePolicy:
    """A policy by name: ``ward`` (rate / n_segments / distance_threshold), ``online`` (threshold,
    max_gap_s) or ``uniform`` (rate)."""
    if name == "ward":
        return Ward(rate=rate, n_segments=n_segments, distance_threshold=distance_threshold)
    if name == "online":
        if threshold is None:
            raise ValueError("the online policy needs a threshold (cosine distance, e.g. 0.1)")
        return Online(threshold=threshold, max_gap_s=max_gap_s)
    if name == "uniform":
        if rate is None:
            raise ValueError("the uniform policy needs a rate (decodes per second, e.g. 1.0)")
        return Uniform(rate=rate)
    raise ValueError(f"unknown decoding policy {name!r}; choose from {list(POLICIES)}")
