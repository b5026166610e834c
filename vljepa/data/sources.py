"""Readers: the one path every dataset goes through.

A split folder (format in :mod:`vljepa.data.formats`) is read into a list of records with
:func:`read_split`; images are opened with :func:`load_image`. Both take ``on_error``:
``"stop"`` raises :class:`DataError` at the first bad record, ``"skip"`` leaves it out and
counts it in a :class:`SkipReport`, so nothing is dropped without a trace.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from PIL import Image

from vljepa.config import SourceConfig
from vljepa.data.formats import CaptionRecord, DataError, SkipReport, VQARecord

METADATA_FILE = "metadata.jsonl"
QUESTIONS_FILE = "questions.jsonl"
_FIX = "set data.on_error=skip to skip bad records"

OnError = Literal["stop", "skip"]
Task = Literal["caption", "vqa"]


def _check_on_error(on_error: str) -> None:
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")


def load_image(path: str, on_error: OnError = "stop") -> Image.Image | None:
    """Open an image as RGB, decoding it fully so a truncated file fails here.

    On a file that cannot be read, raise :class:`DataError` (``on_error="stop"``) or
    return ``None`` (``on_error="skip"``).
    """
    _check_on_error(on_error)
    try:
        with Image.open(path) as img:
            # Image.open only parses the header; load() decodes the pixels, which is
            # where truncated and corrupt files fail.
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if on_error == "skip":
            return None
        reason = str(exc) or type(exc).__name__
        raise DataError(f"cannot read image '{path}' ({reason}); {_FIX}") from exc


class _Problems:
    """Applies the on_error policy: raise at once, or count the skip."""

    def __init__(self, on_error: OnError) -> None:
        self.on_error = on_error
        self.report = SkipReport()

    def __call__(self, reason: str, where: str, detail: str = "") -> None:
        if self.on_error == "stop":
            raise DataError(f"{where}: {reason}{detail}; {_FIX}")
        self.report.add(reason, where)


def _clean_strings(value: object) -> list[str] | None:
    """A string or a list of strings as a list of stripped strings; None if malformed."""
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    return None


def _caption_record(
    raw: dict, image: str, index: int, where: str, problem: _Problems
) -> CaptionRecord | None:
    key = next(k for k in ("captions", "caption", "text") if k in raw)
    captions = _clean_strings(raw[key])
    if captions is None:
        problem("captions are not strings", where, f" ('{key}' must be a string or a list of strings)")
        return None
    kept = []
    for caption in captions:
        if caption:
            kept.append(caption)
        else:
            problem("empty caption", where)
    if not kept:
        problem("no non-empty caption", where)
        return None
    label = raw.get("label")
    if label is not None and not (isinstance(label, str) and label.strip()):
        problem("invalid label", where, f" (label must be a non-empty string, got {label!r})")
        return None
    return CaptionRecord(
        image=image,
        captions=tuple(kept),
        index=index,
        label=label.strip() if label is not None else None,
    )


def _vqa_record(raw: dict, image: str, index: int, where: str, problem: _Problems) -> VQARecord | None:
    question, answer = raw["question"], raw.get("answer")
    if not isinstance(question, str) or not question.strip():
        problem("empty question", where)
        return None
    if not isinstance(answer, str) or not answer.strip():
        problem("empty answer", where)
        return None
    answer = answer.strip()
    answers = _clean_strings(raw.get("answers", [answer]))
    if answers is None or not all(answers):
        problem("invalid answers", where, " ('answers' must be a list of non-empty strings)")
        return None
    if answer not in answers:
        answers.insert(0, answer)
    qtype = raw.get("type", "")
    return VQARecord(
        image=image,
        question=question.strip(),
        answer=answer,
        answers=tuple(dict.fromkeys(answers)),  # de-duplicated, order kept
        type=qtype if isinstance(qtype, str) else str(qtype),
        index=index,
    )


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
    _check_on_error(on_error)
    if task not in ("caption", "vqa"):
        raise ValueError(f"task must be 'caption' or 'vqa', got {task!r}")
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

    problem = _Problems(on_error)
    records: list = []
    other_task = 0  # records that belong to the other task, to explain an empty result
    seen_images: dict[str, bool] = {}  # VQA records share images: stat each file once
    for path in files:
        with path.open(encoding="utf-8") as f:
            for index, line in enumerate(f):
                if not line.strip():
                    continue  # blank lines (e.g. a trailing one) are not records
                where = f"{path}:{index + 1}"
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as exc:
                    problem("invalid JSON", where, f" ({exc.msg} at column {exc.colno})")
                    continue
                if not isinstance(raw, dict):
                    problem("record is not a JSON object", where)
                    continue
                is_caption = any(k in raw for k in ("captions", "caption", "text"))
                is_vqa = "question" in raw
                if not (is_caption or is_vqa):
                    problem("record has neither captions nor a question", where)
                    continue
                if not (is_caption if task == "caption" else is_vqa):
                    other_task += 1
                    continue
                file_name = raw.get("file_name")
                if not isinstance(file_name, str) or not file_name:
                    problem("missing file_name", where)
                    continue
                image = str(root / file_name)
                if image not in seen_images:
                    seen_images[image] = Path(image).is_file()
                if not seen_images[image]:
                    problem("image not found", where, f" ('{file_name}' is not in '{root}')")
                    continue
                build = _caption_record if task == "caption" else _vqa_record
                record = build(raw, image, index, where, problem)
                if record is not None:
                    records.append(record)

    if not records:
        kind, other = ("caption", "question") if task == "caption" else ("question", "caption")
        message = f"no usable {kind} records in {', '.join(map(str, files))}: found {other_task} {other} records"
        if other_task:
            message += f" (use task={'vqa' if task == 'caption' else 'caption'})"
        if problem.report.total:
            message += f"; {problem.report.summary()}"
        raise DataError(message)
    return records, problem.report


def read_source(source: SourceConfig, *, on_error: OnError = "stop", work_dir: str | Path = ".") -> tuple[list, SkipReport]:
    """Read one configured source into caption or VQA records (``source.task``).

    ``work_dir`` is where sources whose images live inside containers are unpacked once.
    """
    fmt = source.format
    if fmt == "auto":
        fmt = "imagefolder"
    if fmt == "imagefolder":
        records, report = read_split(source.path, source.task, on_error=on_error)
    else:
        raise DataError(f"data source format '{source.format}' is not supported yet; use imagefolder")
    if source.max_records:
        records = records[: source.max_records]
    return records, report
