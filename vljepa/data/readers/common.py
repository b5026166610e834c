"""What the readers share: the on_error policy, image loading, paths kept inside their folder,
JSON files read as UTF-8, and records built from raw dicts."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from PIL import Image

from vljepa.config import SourceConfig
from vljepa.data.formats import CaptionRecord, DataError, SkipReport, VQARecord

OnError = Literal["stop", "skip"]
Task = Literal["caption", "vqa"]
# ``report(reason, where, detail, fix)``: a Problems, or a Manifest's ``problem`` while unpacking.
Report = Callable[[str, str, str, str], None]

FIX = "set data.on_error=skip to skip bad records"
CAPTION_KEYS = ("captions", "caption", "text")


def check_on_error(on_error: str) -> None:
    """Raise ValueError unless ``on_error`` is ``"stop"`` or ``"skip"``."""
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")


def check_task(task: str) -> None:
    """Raise ValueError unless ``task`` is ``"caption"`` or ``"vqa"``."""
    if task not in ("caption", "vqa"):
        raise ValueError(f"task must be 'caption' or 'vqa', got {task!r}")


def load_image(path: str, on_error: OnError = "stop") -> Image.Image | None:
    """Open an image as RGB, decoding it fully so a truncated file fails here.

    On a file that cannot be read, raise :class:`DataError` (``on_error="stop"``) or
    return ``None`` (``on_error="skip"``).
    """
    check_on_error(on_error)
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
        raise DataError(f"cannot read image '{path}' ({reason}); {FIX}") from exc


class Problems:
    """Applies the on_error policy: raise at once, or count the skip."""

    def __init__(self, on_error: OnError) -> None:
        self.on_error = on_error
        self.report = SkipReport()

    def __call__(self, reason: str, where: str, detail: str = "", fix: str = FIX) -> None:
        """Raise ``where: reason detail; fix`` (stop) or count ``reason`` at ``where`` (skip)."""
        if self.on_error == "stop":
            raise DataError(f"{where}: {reason}{detail}; {fix}")
        self.report.add(reason, where)


def no_records(task: Task, where: str, other_task: int, report: SkipReport) -> DataError:
    """The error for a source that yielded nothing: what it held instead, and what was skipped."""
    kind, other = ("caption", "question") if task == "caption" else ("question", "caption")
    message = f"no usable {kind} records in {where}: found {other_task} {other} records"
    if other_task:
        message += f" (use task={'vqa' if task == 'caption' else 'caption'})"
    if report.total:
        message += f"; {report.summary()}"
    return DataError(message)


# --- paths and files --------------------------------------------------------------------------


def inside(root: str | Path, relative: str) -> Path | None:
    """``root / relative`` with ``..`` collapsed, or None when it leads outside ``root``.

    Outside means an absolute path elsewhere, ``..`` climbing out, or a folder on the way that is
    a symlink leading out. The file itself may be a symlink: the converters in ``scripts/`` link
    the original images into a split by default. (Strings, not Path objects: this runs per record.)
    """
    top = os.path.abspath(root)
    path = os.path.normpath(os.path.join(top, relative))
    if not _within(path, top):
        return None
    folder = top
    for part in path[len(top):].lstrip(os.sep).split(os.sep)[:-1]:
        folder = os.path.join(folder, part)
        if os.path.islink(folder) and not _within(os.path.realpath(folder), os.path.realpath(top)):
            return None
    return Path(path)


def _within(path: str, top: str) -> bool:
    """Whether normalized absolute ``path`` is ``top`` or below it."""
    return path == top or path.startswith(top if top.endswith(os.sep) else top + os.sep)


def report_escape(report: Report, where: str, name: str, folder: str, root: str | Path) -> None:
    """Record that the image path ``name`` of the record at ``where`` leads outside its ``folder``."""
    report(f"image path escapes the {folder}", where, f" ('{name}' is outside '{root}')",
           f"give a path inside the {folder}, or set data.on_error=skip to skip such records")


def bad_byte(data: bytes, exc: UnicodeDecodeError) -> str:
    """Where ``data`` stops being UTF-8: ``invalid byte 0xe9 at position 4`` (bytes counted from 1)."""
    return f"invalid byte 0x{data[exc.start]:02x} at position {exc.start + 1}"


def load_json(path: Path) -> object:
    """A whole JSON file, which must be UTF-8; any problem is a DataError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read '{path}' ({exc.strerror or exc})") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"'{path}' is not UTF-8 (invalid byte 0x{data[exc.start]:02x} on line {line}); re-save the file as UTF-8"
        ) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"'{path}' is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc


def first(items: object) -> object:
    """The first element of a non-empty list, else None."""
    return items[0] if isinstance(items, list) and items else None


def json_source(source: SourceConfig, parsed: object) -> tuple[Path, object]:
    """The path of a JSON source and its contents (``parsed`` when detection already read them)."""
    path = Path(source.path).expanduser().resolve()
    if parsed is None:
        if not path.is_file():
            raise DataError(f"data source '{source.path}' does not exist; expected a JSON file")
        parsed = load_json(path)
    return path, parsed


def images_folder(source: SourceConfig, fmt: str) -> Path:
    """The folder that coco / vqa image files live in, which these formats cannot guess."""
    if not source.images:
        raise DataError(
            f"{fmt} source '{source.path}' needs the folder its images live in: set images in the source, "
            f"e.g. data.sources=[{{path: {source.path}, format: {fmt}, images: path/to/images}}]"
        )
    images = Path(source.images).expanduser().resolve()
    if not images.is_dir():
        raise DataError(f"images folder '{source.images}' of {fmt} source '{source.path}' does not exist")
    return images


# --- records from raw dicts -------------------------------------------------------------------


def clean_strings(value: object) -> list[str] | None:
    """A string or a list of strings as a list of stripped strings; None if malformed."""
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    return None


def holds(raw: dict, task: Task) -> bool:
    """Whether a raw record holds what ``task`` reads: a caption key (caption) or a question (vqa)."""
    return any(k in raw for k in CAPTION_KEYS) if task == "caption" else "question" in raw


def caption_record(raw: dict, image: str, index: int, where: str, problem: Problems) -> CaptionRecord | None:
    """A caption record from a raw dict with a caption key, or None after reporting why not."""
    key = next(k for k in CAPTION_KEYS if k in raw)
    captions = clean_strings(raw[key])
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


def vqa_record(raw: dict, image: str, index: int, where: str, problem: Problems) -> VQARecord | None:
    """A VQA record from a raw dict with a question, or None after reporting why not."""
    question, answer = raw["question"], raw.get("answer")
    if not isinstance(question, str) or not question.strip():
        problem("empty question", where)
        return None
    if not isinstance(answer, str) or not answer.strip():
        problem("empty answer", where)
        return None
    answer = answer.strip()
    answers = clean_strings(raw.get("answers", [answer]))
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


def build_record(task: Task, raw: dict, image: str, index: int, where: str,
                 problem: Problems) -> CaptionRecord | VQARecord | None:
    """:func:`caption_record` or :func:`vqa_record`, by ``task``."""
    return (caption_record if task == "caption" else vqa_record)(raw, image, index, where, problem)


def _human_answers(value: object) -> list[str] | None:
    """Answers as given by annotators -> distinct strings, most frequent first (ties: first seen).

    Accepts a list of strings, VQAv2's ``[{"answer": ...}, ...]``, or the columnar
    ``{"answer": [...]}`` that ``datasets`` makes of a sequence of dicts; None if malformed.
    """
    if isinstance(value, dict) and isinstance(value.get("answer"), list):
        value = value["answer"]
    if not isinstance(value, list):
        return None
    texts = [v.get("answer") if isinstance(v, dict) else v for v in value]
    if not all(isinstance(t, str) for t in texts):
        return None
    counts = Counter(t.strip() for t in texts if t.strip())
    return [t for t, _ in counts.most_common()]


def vqa_raw(question: object, answer: object, answers: object, qtype: object) -> dict:
    """A VQA record as read_split sees one: ``answer`` is the given one or else the majority."""
    human = _human_answers(answers) if answers is not None else []
    raw = {"question": question, "type": qtype if isinstance(qtype, str) else ""}
    if human is None:
        raw["answers"] = answers  # malformed: vqa_record reports it
        human = []
    elif human:
        raw["answers"] = human
    if isinstance(answer, str) and answer.strip():
        raw["answer"] = answer
    elif human:
        raw["answer"] = human[0]
    return raw
