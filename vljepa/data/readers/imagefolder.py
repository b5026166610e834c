"""Split folders: images + ``metadata.jsonl`` / ``questions.jsonl`` (format in :mod:`vljepa.data.formats`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from vljepa.config import SourceConfig
from vljepa.data.formats import CaptionRecord, DataError, SkipReport, VQARecord
from vljepa.data.readers.common import (
    OnError,
    Problems,
    Task,
    bad_byte,
    build_record,
    check_on_error,
    check_task,
    holds,
    inside,
    no_records,
    report_escape,
)

METADATA_FILE = "metadata.jsonl"
QUESTIONS_FILE = "questions.jsonl"
_NOT_UTF8_FIX = "re-save the file as UTF-8, or set data.on_error=skip to skip such lines"


def read_split(
    split_dir: str | Path, task: Task, on_error: OnError = "stop"
) -> tuple[list[CaptionRecord] | list[VQARecord], SkipReport]:
    """Read the caption or VQA records of a split folder.

    Caption records come from ``metadata.jsonl``; VQA records from ``metadata.jsonl``
    and ``questions.jsonl``, whichever exist. Records of the other task are passed over.
    Every bad record raises :class:`DataError` naming ``file:line`` (``on_error="stop"``)
    or is skipped and counted in the returned :class:`SkipReport` (``on_error="skip"``).
    A missing folder, missing record files, or no usable record is always an error.
    """
    check_on_error(on_error)
    check_task(task)
    problem = Problems(on_error)
    return _read_split(split_dir, task, problem), problem.report


def read(source: SourceConfig, problem: Problems, *, parsed: object, work_dir: Path | None) -> list:
    """The ``imagefolder`` reader: the split folder at ``source.path``."""
    return _read_split(source.path, source.task, problem)


def _read_split(split_dir: str | Path, task: Task, problem: Problems) -> list:
    """:func:`read_split`, reporting to ``problem``."""
    root = Path(split_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(
            f"dataset folder '{split_dir}' does not exist; expected a folder with images and "
            f"{METADATA_FILE} (see vljepa.data.formats)"
        )
    names = [METADATA_FILE] if task == "caption" else [METADATA_FILE, QUESTIONS_FILE]
    files = [root / n for n in names if (root / n).is_file()]
    if not files:
        raise DataError(
            f"no {' or '.join(names)} in '{root}'; a {task} split needs one, with one JSON "
            "record per line (see vljepa.data.formats)"
        )

    records: list = []
    other_task = 0  # records that belong to the other task, to explain an empty result
    seen_images: dict[Path, bool] = {}  # VQA records share images: stat each file once
    for path in files:
        for index, where, line in _lines(path, problem):
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                problem("invalid JSON", where, f" ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(raw, dict):
                problem("record is not a JSON object", where)
                continue
            if not (holds(raw, "caption") or holds(raw, "vqa")):
                problem("record has neither captions nor a question", where)
                continue
            if not holds(raw, task):
                other_task += 1
                continue
            file_name = raw.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                problem("missing file_name", where)
                continue
            image = inside(root, file_name)
            if image is None:
                report_escape(problem, where, file_name, "split folder", root)
                continue
            if image not in seen_images:
                seen_images[image] = image.is_file()
            if not seen_images[image]:
                problem("image not found", where, f" ('{file_name}' is not in '{root}')")
                continue
            record = build_record(task, raw, str(image), index, where, problem)
            if record is not None:
                records.append(record)

    if not records:
        raise no_records(task, ", ".join(map(str, files)), other_task, problem.report)
    return records


def _lines(path: Path, problem: Problems) -> Iterator[tuple[int, str, str]]:
    """``(index, "file:line", text)`` of each non-blank line; a line that is not UTF-8 is a problem."""
    with path.open("rb") as f:
        for index, data in enumerate(f):
            where = f"{path}:{index + 1}"
            try:
                text = data.decode("utf-8-sig" if index == 0 else "utf-8")
            except UnicodeDecodeError as exc:
                problem("line is not UTF-8", where, f" ({bad_byte(data, exc)} of the line)", _NOT_UTF8_FIX)
                continue
            if text.strip():  # blank lines (e.g. a trailing one) are not records
                yield index, where, text
