"""Sources whose images live in containers (tar shards, dataset rows), unpacked once to a folder.

The folder holds the images as regular files and a manifest, ``samples.jsonl``, so image loading
and the embedding cache (keyed by file path, size and modification time) treat them like any
other image, and every later read replays the same records and skips, whatever its on_error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from vljepa.atomic import atomic_folder
from vljepa.config import SourceConfig
from vljepa.data.readers.common import FIX, Problems, Task, build_record, holds, inside, report_escape

SAMPLES_FILE = "samples.jsonl"
# Part of every folder's key: a manifest written by an older reader is not reused.
_MANIFEST_VERSION = "2"


def work_folder(work_dir: str | Path | None, source: SourceConfig, fmt: str, key: str) -> Path:
    """``work_dir/<fmt>/<hash of key>``: where the source's images are unpacked."""
    if work_dir is None:
        raise ValueError(f"reading '{source.path}' ({fmt}) writes its images under work_dir; pass work_dir")
    digest = hashlib.sha256(f"{_MANIFEST_VERSION}|{key}".encode()).hexdigest()[:20]
    return Path(work_dir).expanduser() / fmt / digest


def file_identity(path: Path) -> str:
    """A file's resolved path, size and modification time: changes when the file does."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def materialize(dest: Path, build: Callable[[Path], None]) -> Path:
    """Create folder ``dest`` with ``build(tmp)`` once; an existing one is reused (delete it to rebuild).

    Built in a temporary sibling and renamed, so a crash or a concurrent process never leaves or
    sees a half-written folder; when another process finishes first, its folder is kept.
    """
    if not (dest / SAMPLES_FILE).is_file():
        with atomic_folder(dest, replace=False) as tmp:
            build(tmp)
    return dest


class Manifest:
    """Writes ``samples.jsonl``: one line per sample (``where``, ``image`` relative to the folder or
    absolute, ``raw`` record fields) or per problem found while unpacking (``problem``, ``where``,
    ``detail``, ``fix``)."""

    def __init__(self, folder: Path) -> None:
        self._f = (folder / SAMPLES_FILE).open("w", encoding="utf-8")

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def sample(self, where: str, image: str | None, raw: dict) -> None:
        """Record one sample; ``image`` is relative to the folder, or absolute, or None if it has none."""
        self._f.write(json.dumps({"where": where, "image": image, "raw": raw}) + "\n")

    def problem(self, reason: str, where: str, detail: str = "", fix: str = FIX) -> None:
        """Record one problem, reported again by every read of the folder."""
        self._f.write(json.dumps({"problem": reason, "where": where, "detail": detail, "fix": fix}) + "\n")


def manifest_records(folder: Path, task: Task, problem: Problems, tally: dict[str, int]) -> list:
    """Records of a materialized folder. ``tally["samples"]`` numbers samples across the folders of
    one source (a record's ``index``); ``tally["other"]`` counts samples of the other task."""
    records = []
    with (folder / SAMPLES_FILE).open(encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            where = entry["where"]
            if "problem" in entry:
                problem(entry["problem"], where, entry["detail"], entry["fix"])
                continue
            index = tally["samples"]
            tally["samples"] += 1
            raw = entry["raw"]
            if not (holds(raw, "caption") or holds(raw, "vqa")):
                problem("sample has neither captions nor a question", where)
                continue
            if not holds(raw, task):
                tally["other"] += 1
                continue
            name = entry["image"]
            if name is None:
                problem("sample has no image", where)
                continue
            # An absolute path is a file a dataset's path column named, checked when the manifest was written.
            image = Path(name) if Path(name).is_absolute() else inside(folder, name)
            if image is None:
                report_escape(problem, where, name, "unpacked folder", folder)
                continue
            if not image.is_file():
                problem("image not found", where, f" ('{image}')")
                continue
            record = build_record(task, raw, str(image), index, where, problem)
            if record is not None:
                records.append(record)
    return records
