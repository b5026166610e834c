"""Writes records as a split folder (images + metadata.jsonl / questions.jsonl); shared by the
converters in this folder, never imported by the library."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from vljepa.data.formats import CaptionRecord, VQARecord


def place_images(paths: list[str], out: Path, *, copy: bool) -> dict[str, str]:
    """Symlink (or copy) each distinct image into ``out/images/``; returns source -> file_name.

    Names keep the source file name; a clash (same name, different folder) gets a numeric prefix.
    """
    (out / "images").mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    taken: set[str] = set()
    for src in dict.fromkeys(paths):
        name = Path(src).name
        if name in taken:
            name = f"{len(taken):08d}_{name}"
        taken.add(name)
        target = out / "images" / name
        if target.is_symlink() or target.exists():
            target.unlink()
        if copy:
            shutil.copy2(src, target)
        else:
            os.symlink(os.path.abspath(src), target)
        names[src] = f"images/{name}"
    return names


def write_split(records: list, out: Path, *, copy: bool) -> Path:
    """Caption records -> ``metadata.jsonl``; VQA records -> ``questions.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    names = place_images([r.image for r in records], out, copy=copy)
    is_vqa = bool(records) and isinstance(records[0], VQARecord)
    path = out / ("questions.jsonl" if is_vqa else "metadata.jsonl")
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            if isinstance(r, CaptionRecord):
                line = {"file_name": names[r.image], "captions": list(r.captions)}
                if r.label is not None:
                    line["label"] = r.label
            else:
                line = {"file_name": names[r.image], "question": r.question, "answer": r.answer,
                        "answers": list(r.answers), "type": r.type}
            f.write(json.dumps(line) + "\n")
    return path


def convert(source, out: Path, *, copy: bool, on_error: str, noun: str) -> int:
    """Read ``source`` (a SourceConfig) through the library's readers and write it as a split
    folder; prints what was written and skipped. Returns the exit code."""
    from vljepa.data.formats import DataError
    from vljepa.data.readers import read_source

    try:
        records, report = read_source(source, on_error=on_error)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    path = write_split(records, out, copy=copy)
    print(f"wrote {len(records)} {noun} to {path}; {report.summary()}")
    return 0
