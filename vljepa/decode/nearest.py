"""Candidate bank: decode a predicted embedding into text by nearest-neighbour search.

VL-JEPA predicts the *embedding* of an answer. When text is needed, the cheapest decoder is a
bank of candidate texts encoded once by the Y-encoder: the answer is the candidate whose
embedding has the highest cosine similarity to the prediction.

On disk a bank is a folder with ``embeddings.safetensors`` (one tensor, ``embeddings: [N, D]``,
L2-normalised float32) and ``texts.json`` (a JSON list of the N texts, in row order).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from vljepa.atomic import atomic_folder

EMBEDDINGS_FILE = "embeddings.safetensors"
TEXTS_FILE = "texts.json"
_TENSOR_NAME = "embeddings"
_FORMAT = "vljepa.candidate_bank"


class CandidateBank:
    """Unique candidate texts + their L2-normalised embeddings ``[N, D]``; nearest-neighbour
    decoding by cosine similarity.

    Args:
        texts: the candidate texts, unique, one per embedding row.
        embeddings: ``[N, D]`` finite floating-point embeddings; stored as float32, L2-normalised.
    """

    def __init__(self, texts: Sequence[str], embeddings: torch.Tensor) -> None:
        texts = _validate(texts, embeddings)
        norms = embeddings.detach().float().norm(dim=-1)
        if bool((norms == 0).any()):
            row = int((norms == 0).nonzero()[0])
            raise ValueError(
                f"candidate {texts[row]!r} (row {row}) has an all-zero embedding, which has no "
                "direction to compare by cosine; check the encoder output for that text"
            )
        self._set(texts, F.normalize(embeddings.detach().float(), dim=-1))

    def _set(self, texts: list[str], embeddings: torch.Tensor) -> None:
        # Shared by __init__ and load: load must not re-normalise, or a round trip would not be
        # bit-identical (normalising an already unit vector can move the last bit).
        self._texts = texts
        self._embeddings = embeddings.contiguous()
        self._row = {text: i for i, text in enumerate(texts)}

    @classmethod
    def build(
        cls,
        texts: Iterable[str],
        encode: Callable[[list[str]], torch.Tensor],
        *,
        batch_size: int = 256,
    ) -> CandidateBank:
        """Encode ``texts`` into a bank.

        Duplicates are dropped, keeping the first-seen order. ``encode`` is called on batches of
        at most ``batch_size`` texts under ``torch.no_grad()`` and must return ``[len(batch), D]``.
        The bank is kept on the CPU (float32) so a large bank never competes with the model for
        accelerator memory.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        unique = list(dict.fromkeys(texts))
        if not unique:
            raise ValueError("cannot build a candidate bank from no texts")
        chunks = []
        with torch.no_grad():
            for start in range(0, len(unique), batch_size):
                batch = unique[start : start + batch_size]
                chunks.append(encoded(encode, batch, "texts").detach().float().cpu())
        return cls(unique, torch.cat(chunks))

    @property
    def texts(self) -> list[str]:
        """The candidate texts, in row order (a copy)."""
        return list(self._texts)

    @property
    def embeddings(self) -> torch.Tensor:
        """The L2-normalised float32 embeddings ``[N, D]`` (do not modify in place)."""
        return self._embeddings

    @property
    def dim(self) -> int:
        """Embedding width D."""
        return self._embeddings.shape[1]

    def __len__(self) -> int:
        return len(self._texts)

    def __repr__(self) -> str:
        return f"CandidateBank(n={len(self)}, dim={self.dim})"

    def index(self, text: str) -> int:
        """Row of ``text`` in the bank; ``KeyError`` if it is not a candidate."""
        try:
            return self._row[text]
        except KeyError:
            raise KeyError(
                f"{text!r} is not in the candidate bank ({len(self)} texts); rebuild the bank "
                "with it included"
            ) from None

    def search(
        self, queries: torch.Tensor, k: int = 1, *, batch_size: int = 4096
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most cosine-similar candidates for each query.

        Args:
            queries: ``[B, D]`` embeddings (normalised here, any norm is fine).
            k: neighbours per query, clipped to the bank size.
            batch_size: bounds memory: each block of scores holds at most ``batch_size**2``
                entries (64 MiB at the default), whatever the bank size.

        Returns:
            ``(scores, indices)``, both ``[B, min(k, N)]``, best first, on the queries' device.
        """
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"queries must be [B, {self.dim}], got {tuple(queries.shape)}"
                + ("; use queries[None] for a single vector" if queries.dim() == 1 else "")
            )
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not bool(torch.isfinite(queries).all()):
            raise ValueError("queries contain NaN or Inf")
        k = min(k, len(self))
        bank = self._embeddings
        q_all = F.normalize(queries.detach().float().to(bank.device), dim=-1)
        # Few queries -> score many bank rows at once; many queries -> fewer rows per block.
        q_rows = min(batch_size, max(1, q_all.shape[0]))
        bank_rows = max(1, batch_size * batch_size // q_rows)
        scores, indices = [], []
        for q_start in range(0, q_all.shape[0], q_rows):
            q = q_all[q_start : q_start + q_rows]
            best_s = q.new_empty(q.shape[0], 0)
            best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=bank.device)
            for b_start in range(0, len(self), bank_rows):
                block = q @ bank[b_start : b_start + bank_rows].T
                s, i = block.topk(min(k, block.shape[1]), dim=1)
                # Running top-k: merge this block's best with the best so far (fewer than k
                # while the blocks seen so far hold fewer than k rows).
                cand_s = torch.cat([best_s, s], dim=1)
                cand_i = torch.cat([best_i, i + b_start], dim=1)
                best_s, pick = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
                best_i = cand_i.gather(1, pick)
            scores.append(best_s)
            indices.append(best_i)
        out_s = torch.cat(scores) if scores else q_all.new_empty(0, k)
        out_i = torch.cat(indices) if indices else torch.empty(0, k, dtype=torch.long)
        return out_s.to(queries.device), out_i.to(queries.device)

    def decode(self, queries: torch.Tensor, k: int = 1) -> list[list[str]]:
        """The texts of the ``k`` nearest candidates for each query ``[B, D]``, best first."""
        _, indices = self.search(queries, k)
        return [[self._texts[i] for i in row] for row in indices.tolist()]

    def save(self, path: str | Path) -> None:
        """Write the bank to folder ``path`` (created if needed).

        The folder is written whole or not at all (:func:`vljepa.atomic.atomic_folder`), replacing
        an existing one. The embeddings file records a hash of the texts,
        so ``load`` also rejects a pair of files that come from two different saves.
        """
        texts_json = json.dumps(self._texts, ensure_ascii=False)
        with atomic_folder(path) as tmp:
            save_file({_TENSOR_NAME: self._embeddings.cpu().contiguous()}, str(tmp / EMBEDDINGS_FILE),
                      metadata={"format": _FORMAT, "texts_sha256": _sha256(texts_json)})
            (tmp / TEXTS_FILE).write_text(texts_json, encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CandidateBank:
        """Read a bank written by :meth:`save` (onto the CPU)."""
        folder = Path(path)
        missing = [name for name in (EMBEDDINGS_FILE, TEXTS_FILE) if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"'{folder}' is not a candidate bank: missing {', '.join(missing)}; create one "
                "with CandidateBank.build(texts, encode).save(path)"
            )
        texts_json = (folder / TEXTS_FILE).read_text(encoding="utf-8")
        try:
            texts = json.loads(texts_json)
        except json.JSONDecodeError as err:
            raise ValueError(f"'{folder / TEXTS_FILE}' is not valid JSON ({err})") from None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"'{folder / TEXTS_FILE}' must hold a JSON list of strings")
        with safe_open(str(folder / EMBEDDINGS_FILE), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT or _TENSOR_NAME not in f.keys():
                raise ValueError(
                    f"'{folder / EMBEDDINGS_FILE}' was not written by CandidateBank.save "
                    f"(expected metadata format={_FORMAT!r} and a tensor named {_TENSOR_NAME!r})"
                )
            embeddings = f.get_tensor(_TENSOR_NAME)
        # Hash the texts re-serialised the way save does, so the check is independent of how
        # the JSON file happens to be formatted.
        if metadata.get("texts_sha256") != _sha256(json.dumps(texts, ensure_ascii=False)):
            raise ValueError(
                f"'{folder}': {TEXTS_FILE} and {EMBEDDINGS_FILE} come from different saves; "
                "save the bank again"
            )
        bank = cls.__new__(cls)
        bank._set(_validate(texts, embeddings), embeddings.float())
        return bank


def encoded(encode: Callable[[list[str]], torch.Tensor], texts: list[str], what: str) -> torch.Tensor:
    """``encode(texts)``, checked to be a ``[len(texts), D]`` tensor (the error names ``what`` was encoded)."""
    emb = encode(texts)
    shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
    if not isinstance(emb, torch.Tensor) or len(shape) != 2 or shape[0] != len(texts):
        raise ValueError(f"encode returned {shape} for {len(texts)} {what}; it must return a [{len(texts)}, D] tensor")
    return emb


def _validate(texts: Sequence[str], embeddings: torch.Tensor) -> list[str]:
    """Check that texts and embeddings form a bank; return the texts as a list."""
    texts = list(texts)
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D [N, D], got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be floating point, got {embeddings.dtype}")
    if len(texts) != embeddings.shape[0]:
        raise ValueError(
            f"{len(texts)} texts but {embeddings.shape[0]} embedding rows; "
            "they must match one to one"
        )
    if not texts:
        raise ValueError("a candidate bank needs at least one text")
    not_str = next((t for t in texts if not isinstance(t, str)), None)
    if not_str is not None:
        raise TypeError(f"candidate texts must be str, got {type(not_str).__name__}: {not_str!r}")
    seen: set[str] = set()
    for text in texts:
        if text in seen:
            raise ValueError(
                f"duplicate candidate text {text!r}; use CandidateBank.build, which de-duplicates"
            )
        seen.add(text)
    if not bool(torch.isfinite(embeddings).all()):
        row = int((~torch.isfinite(embeddings)).any(dim=1).nonzero()[0])
        raise ValueError(f"embedding of {texts[row]!r} (row {row}) contains NaN or Inf")
    return texts


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
