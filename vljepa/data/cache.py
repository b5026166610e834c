"""On-disk cache of frozen-tower outputs.

A frozen encoder gives the same output for the same input every epoch, so it is run once. Each
entry is a folder named by a key: the SHA-256 of the encoder's identity (kind, weights, input size,
pooling, frames per clip, ...) and of the items it encoded (image paths with size and modification
time, clips with their window and the stamps of their files, or the texts). A different encoder,
preprocessing or data gives a different key, so a stale entry is never read. Entries are written
to a temporary folder and renamed, so a crash leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vljepa.atomic import atomic_folder
from vljepa.data.formats import Clip

SHARD_ITEMS = 8192


def cache_key(identity: dict, items: Sequence[str]) -> str:
    """SHA-256 over the encoder identity and the ordered item list."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for item in items:
        h.update(item.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def file_items(paths: Sequence[str]) -> list[str]:
    """Image paths with their size and modification time, so an edited file changes the key.

    A clip reference (:class:`~vljepa.data.formats.Clip`) keeps its window (``start`` / ``end``)
    and adds the stamp of every file it reads: the video, each frame of a list or of a folder.
    """
    out = []
    for p in paths:
        clip = Clip.parse(p)
        if clip is None:
            out.append(f"{p}|{_stamp(p)}")
            continue
        files = list(clip.files)
        if clip.video and os.path.isdir(clip.video):
            files = [os.path.join(clip.video, f) for f in sorted(os.listdir(clip.video))]
        out.append("|".join([p, *(f"{f}|{_stamp(f)}" for f in files)]))
    return out


def _stamp(path: str) -> str:
    """``size|mtime_ns`` of a file, or ``missing``."""
    try:
        st = os.stat(path)
        return f"{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return "missing"


class EmbeddingCache:
    """A folder of cache entries; each entry holds tensors whose first dim indexes the items."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        entry = self.root / key
        manifest = entry / "manifest.json"
        if not manifest.is_file():
            return None
        meta = json.loads(manifest.read_text())
        parts: dict[str, list[torch.Tensor]] = {}
        for shard in meta["shards"]:
            for name, t in load_file(str(entry / shard)).items():
                parts.setdefault(name, []).append(t)
        out = {name: torch.cat(ts) for name, ts in parts.items()}
        out.update({name: load_file(str(entry / "whole.safetensors"))[name] for name in meta.get("whole", [])})
        return out

    def save(self, key: str, sharded: dict[str, torch.Tensor], whole: dict[str, torch.Tensor] | None = None,
             info: dict | None = None) -> None:
        """Store ``sharded`` tensors (split along dim 0) and ``whole`` tensors (kept as one)."""
        with atomic_folder(self.root / key) as tmp:
            n = next(iter(sharded.values())).shape[0] if sharded else 0
            shards = []
            for i, start in enumerate(range(0, max(n, 1), SHARD_ITEMS)):
                name = f"shard-{i:05d}.safetensors"
                save_file({k: v[start:start + SHARD_ITEMS].contiguous() for k, v in sharded.items()}, str(tmp / name))
                shards.append(name)
            if whole:
                save_file({k: v.contiguous() for k, v in whole.items()}, str(tmp / "whole.safetensors"))
            meta = {"key": key, "items": n, "shards": shards, "whole": sorted(whole or {}), "info": info or {}}
            (tmp / "manifest.json").write_text(json.dumps(meta, indent=2))

    def get_or_compute(
        self,
        identity: dict,
        items: Sequence[str],
        compute: Callable[[], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]],
        *,
        key_items: Sequence[str] | None = None,
        info: dict | None = None,
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """Cached tensors for ``items`` under ``identity``; ``compute`` runs only on a miss.

        ``compute`` returns ``(sharded, whole)``. Returns the tensors and whether it was a hit.
        """
        key = cache_key(identity, key_items if key_items is not None else items)
        found = self.load(key)
        if found is not None:
            return found, True
        sharded, whole = compute()
        self.save(key, sharded, whole, info={**(info or {}), "identity": identity})
        return {**sharded, **whole}, False
