"""Split folders: images or clips + ``metadata.jsonl`` / ``questions.jsonl`` (format in :mod:`vljepa.data.formats`)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from vljepa.config import SourceConfig
from vljepa.data.formats import CaptionRecord, Clip, DataError, SkipReport, VQARecord
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
from vljepa.data.readers.video import VIDEO_SUFFIXES

_CLIP_KEYS = ("video", "frames")
_WINDOW_FIX = "give 0 <= start < end (seconds), or set data.on_error=skip to skip such records"

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
            if any(k in raw for k in _CLIP_KEYS) or _is_video_name(raw.get("file_name")):
                clip = _clip(raw, root, where, problem, seen_images)
                if clip is None:
                    continue
                record = build_record(task, raw, clip.ref(), index, where, problem)
                if record is not None:
                    records.append(replace(record, clip=clip))
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


def _is_video_name(name: object) -> bool:
    return isinstance(name, str) and name.lower().endswith(VIDEO_SUFFIXES)


def _number(raw: dict, key: str) -> float | None | bool:
    """``raw[key]`` as a float; None when absent; False when it is not a finite number."""
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return float(value)


def _clip(raw: dict, root: Path, where: str, problem: Problems, seen: dict[Path, bool]) -> Clip | None:
    """The clip of a video record (``video``, ``frames`` or a video ``file_name``), or None after
    reporting why not. Files must exist inside the split; windows are checked against the video
    when it is read."""
    given = [k for k in ("file_name", *_CLIP_KEYS) if k in raw]
    if len(given) > 1:
        problem("record has more than one visual input", where,
                f" (it has {' and '.join(given)})", "give one of file_name, video or frames")
        return None
    key = given[0]
    start, end, fps = _number(raw, "start"), _number(raw, "end"), _number(raw, "fps")
    for name, value in (("start", start), ("end", end), ("fps", fps)):
        if value is False:
            problem(f"invalid {name}", where, f" ({name} must be a number of {'frames a second' if name == 'fps' else 'seconds'}, "
                    f"got {raw[name]!r})")
            return None
    if start is not None and start < 0:
        problem("invalid start", where, f" (start={start} is negative)", _WINDOW_FIX)
        return None
    if end is not None and end <= (start or 0.0):
        problem("invalid end", where, f" (end={end} is not after start={start or 0.0})", _WINDOW_FIX)
        return None
    if fps is not None and fps <= 0:
        problem("invalid fps", where, f" (fps={fps} must be positive)")
        return None
    window = {"start": start or 0.0, "end": end}

    value = raw[key]
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(n, str) and n for n in names):
        problem(f"invalid {key}", where, f" ({key} must be a path{' or a list of frame paths' if key == 'frames' else ''}"
                f", got {value!r})")
        return None
    paths = []
    for name in names:
        path = inside(root, name)
        if path is None:
            report_escape(problem, where, name, "split folder", root)
            return None
        paths.append(path)
    if isinstance(value, list):  # a frame list
        timestamps = raw.get("timestamps")
        if timestamps is None and fps is None:
            problem("frame list without timing", where, " (frames need timestamps or an fps)",
                    "give timestamps (seconds, one per frame) or fps, or set data.on_error=skip to skip such records")
            return None
        if timestamps is not None and not (
                isinstance(timestamps, list) and len(timestamps) == len(names)
                and all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0
                        for t in timestamps)
                and all(b > a for a, b in zip(timestamps, timestamps[1:]))):
            problem("invalid timestamps", where, f" (need {len(names)} increasing seconds >= 0, one per frame)")
            return None
        for name, path in zip(names, paths):
            if path not in seen:
                seen[path] = path.is_file()
            if not seen[path]:
                problem("frame not found", where, f" ('{name}' is not in '{root}')")
                return None
        return Clip(frames=tuple(map(str, paths)), timestamps=tuple(map(float, timestamps or ())),
                    fps=fps if timestamps is None else None, **window)
    path = paths[0]
    if path.is_dir():
        if fps is None:
            problem("frames folder without fps", where, f" ('{value}' is a folder of frames)",
                    "give the folder's frame rate as fps, or set data.on_error=skip to skip such records")
            return None
        return Clip(video=str(path), fps=fps, **window)
    if key == "frames":
        problem("frames folder not found", where, f" ('{value}' is not a folder in '{root}')")
        return None
    if not path.is_file():
        problem("video not found", where, f" ('{value}' is not in '{root}')")
        return None
    if fps is not None:
        problem("fps given for a video file", where, f" ('{value}' has its own timestamps)", "drop fps, "
                "which is for frames folders and frame lists, or set data.on_error=skip to skip such records")
        return None
    return Clip(video=str(path), **window)


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
