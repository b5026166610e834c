"""Folders that appear whole or not at all.

Everything the library writes for later reads (saved models, checkpoints, cache entries, unpacked
sources, candidate banks) is built in a temporary sibling folder, flushed to disk and renamed into
place, so a crash, a full disk or a concurrent process never leaves or sees a half-written folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_tree(folder: str | Path) -> None:
    """Flush every file under ``folder`` to disk (before a rename makes them visible)."""
    for f in Path(folder).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def publish(tmp: str | Path, dest: str | Path, *, replace: bool = True) -> Path:
    """Flush folder ``tmp`` and rename it to ``dest``.

    ``replace=True``: an existing ``dest`` is moved aside, ``tmp`` takes its name, the old one is
    removed. ``replace=False``: an existing ``dest`` (another process finished the same folder
    first) is kept and ``tmp`` is removed.
    """
    tmp, dest = Path(tmp), Path(dest)
    fsync_tree(tmp)
    if not dest.exists():
        try:
            os.rename(tmp, dest)
            return dest
        except OSError:
            if not dest.exists():
                raise
    if not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return dest
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


@contextmanager
def atomic_folder(dest: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """``with atomic_folder(dest) as tmp:`` write into ``tmp``; on a clean exit it becomes ``dest``
    (see :func:`publish`), on an error it is removed and ``dest`` is left as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        publish(tmp, dest, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
