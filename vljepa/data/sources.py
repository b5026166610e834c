"""Readers: the one path every dataset goes through.

A split folder (format in :mod:`vljepa.data.formats`) is read into a list of records with
:func:`read_split`; images are opened with :func:`load_image`. Both take ``on_error``:
``"stop"`` raises :class:`DataError` at the first bad record, ``"skip"`` leaves it out and
counts it in a :class:`SkipReport`, so nothing is dropped without a trace.

:func:`read_source` reads one configured source (:class:`vljepa.config.SourceConfig`) of any
format into the same records, with the same ``on_error`` policy:

==============  ===============================================================================
imagefolder     a split folder (images + ``metadata.jsonl`` / ``questions.jsonl``)
coco            COCO captions JSON (``images`` + ``annotations``); image files under ``images``
vqa             VQAv2 questions JSON (annotations beside it) or GQA questions JSON; images under
                ``images``
webdataset      tar shards: ``KEY.jpg|jpeg|png|webp`` + ``KEY.txt`` (caption) or ``KEY.json``
                (``caption``/``captions`` or ``question``/``answer``/``answers``/``type``)
hf / hf_disk    ``datasets.load_dataset`` (a local folder / data file, or a Hub name) /
                ``datasets.load_from_disk``
auto            :func:`detect_format`
==============  ===============================================================================

Images that live inside containers (tar members, dataset rows) are written once to regular
files under ``work_dir`` so image loading and the embedding cache (keyed by file path, size and
modification time) treat them like any other image.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable
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
        raise _no_records(task, ", ".join(map(str, files)), other_task, problem.report)
    return records, problem.report


def _no_records(task: Task, where: str, other_task: int, report: SkipReport) -> DataError:
    """The error for a source that yielded nothing: what it held instead, and what was skipped."""
    kind, other = ("caption", "question") if task == "caption" else ("question", "caption")
    message = f"no usable {kind} records in {where}: found {other_task} {other} records"
    if other_task:
        message += f" (use task={'vqa' if task == 'caption' else 'caption'})"
    if report.total:
        message += f"; {report.summary()}"
    return DataError(message)


# --------------------------------------------------------------------------------------------
# Sources: every SourceConfig.format, read into the same records
# --------------------------------------------------------------------------------------------

_CAPTION_KEYS = ("captions", "caption", "text")
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_SAMPLES_FILE = "samples.jsonl"  # manifest of a materialized source folder
_GLOB_CHARS = "*?[{"


def read_source(
    source: SourceConfig, *, on_error: OnError = "stop", work_dir: str | Path | None = None
) -> tuple[list[CaptionRecord] | list[VQARecord], SkipReport]:
    """Read one configured source into caption or VQA records (``source.task``).

    ``source.format`` picks the reader (``"auto"`` asks :func:`detect_format`):

    - ``imagefolder``: a split folder, read by :func:`read_split`.
    - ``coco``: a COCO captions JSON; images under ``source.images``. One record per image.
    - ``vqa``: a VQAv2 questions JSON (annotations found beside it) or a GQA-style questions
      JSON; images under ``source.images``. One record per question.
    - ``webdataset``: tar shards of ``KEY.jpg|jpeg|png|webp`` + ``KEY.txt`` / ``KEY.json``.
    - ``hf`` / ``hf_disk``: ``datasets.load_dataset`` / ``datasets.load_from_disk``.

    Images inside containers (tar shards, Hugging Face rows) are written once to regular files
    under ``work_dir`` (``webdataset/<key>/``, ``hf/<key>/``), keyed by the source's identity
    (path, size, modification time / fingerprint), so image loading and the embedding cache see
    ordinary files and a second read reuses them. Every bad record raises :class:`DataError`
    (``on_error="stop"``) or is counted in the returned :class:`SkipReport` (``"skip"``).
    ``source.max_records`` > 0 keeps the first records read (hf sources read only that many rows).
    ``source.types`` (VQA) keeps only questions of those types; a filter that keeps nothing is an error.
    """
    _check_on_error(on_error)
    if source.task not in ("caption", "vqa"):
        raise ValueError(f"task must be 'caption' or 'vqa', got {source.task!r}")
    if not source.path:
        raise DataError("a data source has an empty path; set path to a folder, file or dataset name")
    fmt, parsed = (source.format, None) if source.format != "auto" else _detect(source.path)
    problem = _Problems(on_error)
    if fmt == "imagefolder":
        records, report = read_split(source.path, source.task, on_error=on_error)
        problem.report.merge(report)
    elif fmt == "coco":
        records = _read_coco(source, problem, parsed)
    elif fmt == "vqa":
        records = _read_vqa(source, problem, parsed)
    elif fmt == "webdataset":
        records = _read_webdataset(source, problem, _need_work_dir(work_dir, source, fmt))
    elif fmt in ("hf", "hf_disk"):
        records = _read_hf(source, fmt, problem, _need_work_dir(work_dir, source, fmt))
    else:
        raise DataError(
            f"data source '{source.path}': unknown format '{fmt}'; use one of auto, imagefolder, coco, "
            "vqa, webdataset, hf, hf_disk"
        )
    if source.types:
        if source.task != "vqa":
            raise DataError(f"data source '{source.path}': types={list(source.types)} filters questions; "
                            "it needs task: vqa")
        found = sorted({r.type for r in records})
        records = [r for r in records if r.type in source.types]
        if not records:
            raise DataError(f"data source '{source.path}': no question has a type in {list(source.types)}; "
                            f"its types are {found}")
    if source.max_records > 0:
        records = records[: source.max_records]
    return records, problem.report


def detect_format(path: str | Path) -> str:
    """The format ``format: auto`` reads ``path`` as; the rules, first match wins:

    1. a folder with ``metadata.jsonl`` or ``questions.jsonl`` -> ``imagefolder``;
    2. a folder written by ``datasets``' ``save_to_disk`` (``state.json`` + ``dataset_info.json``,
       or ``dataset_dict.json``) -> ``hf_disk``;
    3. a ``.tar`` / ``.tar.gz`` / ``.tgz`` file, a folder of them, or a glob / brace pattern
       (``shards/{000..009}.tar``) -> ``webdataset``;
    4. a ``.json`` file: ``images`` + ``annotations`` with ``caption`` -> ``coco``; ``questions``
       (VQAv2) or ``{qid: {"imageId", "question", ...}}`` (GQA) -> ``vqa``;
    5. another existing file or folder -> ``hf`` (``datasets.load_dataset`` reads local data files);
    6. a path that does not exist: a dataset name (``owner/name``) -> ``hf``, unless it looks
       like a local path (``/``, ``./``, ``~``, or a known file suffix), which is an error.
    """
    return _detect(str(path))[0]


def _detect(path: str) -> tuple[str, object]:
    """:func:`detect_format`, plus the parsed JSON when it had to read a JSON file."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / METADATA_FILE).is_file() or (p / QUESTIONS_FILE).is_file():
            return "imagefolder", None
        if ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()) or (p / "dataset_dict.json").is_file():
            return "hf_disk", None
        if any(_is_tar(c) for c in p.iterdir()):
            return "webdataset", None
        return "hf", None
    if p.is_file():
        if _is_tar(p):
            return "webdataset", None
        if p.suffix.lower() == ".json":
            data = _load_json(p)
            if _is_coco(data):
                return "coco", data
            if _is_vqav2_questions(data) or _is_gqa(data):
                return "vqa", data
            raise DataError(
                f"cannot tell the format of '{p}': a JSON source must be COCO captions ('images' + "
                "'annotations' with 'caption'), VQAv2 questions ('questions') or GQA questions "
                f"({{qid: {{imageId, question, answer}}}}){_vqa_annotations_hint(data)}; or set the "
                "source's format explicitly"
            )
        return "hf", None
    if any(c in path for c in _GLOB_CHARS):
        shards = _expand_pattern(path)
        if shards and all(_is_tar(s) for s in shards):
            return "webdataset", None
    if path.startswith(("/", "./", "../", "~")) or p.suffix.lower() in (".json", ".jsonl", ".tar", ".parquet", ".csv"):
        raise DataError(f"data source '{path}' does not exist; check the path (relative paths start at the working folder)")
    return "hf", None


def _need_work_dir(work_dir: str | Path | None, source: SourceConfig, fmt: str) -> Path:
    if work_dir is None:
        raise ValueError(f"reading '{source.path}' ({fmt}) writes its images under work_dir; pass work_dir")
    return Path(work_dir).expanduser()


def _load_json(path: Path) -> object:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"'{path}' is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    except OSError as exc:
        raise DataError(f"cannot read '{path}' ({exc.strerror or exc})") from exc


def _first(items: object) -> object:
    return items[0] if isinstance(items, list) and items else None


def _is_coco(data: object) -> bool:
    if not (isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)):
        return False
    first = _first(data["annotations"])
    return first is None or (isinstance(first, dict) and "caption" in first)


def _is_vqav2_questions(data: object) -> bool:
    return isinstance(data, dict) and isinstance(data.get("questions"), list)


def _is_gqa(data: object) -> bool:
    if not isinstance(data, dict) or not data:
        return False
    first = next(iter(data.values()))
    return isinstance(first, dict) and "question" in first and "imageId" in first


def _vqa_annotations_hint(data: object) -> str:
    first = _first(data.get("annotations")) if isinstance(data, dict) else None
    if isinstance(first, dict) and "multiple_choice_answer" in first:
        return " -- this is a VQAv2 annotations file: point path at the questions file, the annotations are found beside it"
    return ""


def _require_images(source: SourceConfig, fmt: str) -> Path:
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


def _json_source(source: SourceConfig, parsed: object) -> tuple[Path, object]:
    path = Path(source.path).expanduser().resolve()
    if parsed is None:
        if not path.is_file():
            raise DataError(f"data source '{source.path}' does not exist; expected a JSON file")
        parsed = _load_json(path)
    return path, parsed


# --- COCO captions ---------------------------------------------------------------------------


def _read_coco(source: SourceConfig, problem: _Problems, parsed: object) -> list[CaptionRecord]:
    """COCO captions: ``images`` [{id, file_name}] + ``annotations`` [{image_id, caption}]; one
    record per image holding all its captions, in the order of ``images``."""
    path, data = _json_source(source, parsed)
    if source.task != "caption":
        raise DataError(f"'{path}' is a COCO captions file: it holds captions, not questions; use task: caption")
    if not _is_coco(data):
        raise DataError(
            f"'{path}' is not a COCO captions file: expected {{\"images\": [{{id, file_name}}], "
            "\"annotations\": [{image_id, caption}]}"
        )
    images = _require_images(source, "coco")
    captions: dict[object, list[str]] = {}
    entries = []
    for i, entry in enumerate(data["images"]):
        if not (isinstance(entry, dict) and "id" in entry and isinstance(entry.get("file_name"), str)):
            problem("invalid image entry", f"{path}:images[{i}]", " (needs 'id' and 'file_name')")
            continue
        captions[entry["id"]] = []
        entries.append((i, entry))
    for j, ann in enumerate(data["annotations"]):
        where = f"{path}:annotations[{j}]"
        if not isinstance(ann, dict) or ann.get("image_id") not in captions:
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            problem("caption of an unknown image_id", where, f" (image_id {image_id!r} is not in 'images')")
            continue
        if not isinstance(ann.get("caption"), str):
            problem("caption is not a string", where)
            continue
        captions[ann["image_id"]].append(ann["caption"])

    records = []
    for i, entry in entries:
        texts = captions[entry["id"]]
        if not texts:
            continue  # an image nobody captioned (e.g. a test split) is not a record
        where = f"{path}:images[{i}]"
        image = images / entry["file_name"]
        if not image.is_file():
            problem("image not found", where, f" ('{entry['file_name']}' is not in '{images}')")
            continue
        record = _caption_record({"captions": texts}, str(image), i, where, problem)
        if record is not None:
            records.append(record)
    if not records:
        raise _no_records("caption", str(path), 0, problem.report)
    return records


# --- VQAv2 / GQA ---------------------------------------------------------------------------------


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


def _vqa_raw(question: object, answer: object, answers: object, qtype: object) -> dict:
    """A VQA record as read_split sees one: ``answer`` is the given one or else the majority."""
    human = _human_answers(answers) if answers is not None else []
    raw = {"question": question, "type": qtype if isinstance(qtype, str) else ""}
    if human is None:
        raw["answers"] = answers  # malformed: _vqa_record reports it
        human = []
    elif human:
        raw["answers"] = human
    if isinstance(answer, str) and answer.strip():
        raw["answer"] = answer
    elif human:
        raw["answer"] = human[0]
    return raw


def _vqa_annotation_candidates(questions: Path) -> list[Path]:
    """Where a VQAv2 questions file's annotations live, by the official naming, then simpler ones:
    ``v2_OpenEnded_mscoco_train2014_questions.json`` -> ``v2_mscoco_train2014_annotations.json``;
    ``X_questions.json`` -> ``X_annotations.json``; ``annotations.json`` beside it."""
    name = questions.name
    names = [
        name.replace("OpenEnded_", "").replace("MultipleChoice_", "").replace("questions", "annotations"),
        name.replace("questions", "annotations"),
        "annotations.json",
    ]
    return [questions.with_name(n) for n in dict.fromkeys(names) if n != name]


def _coco_image_names(image_id: object, subtype: str) -> list[str]:
    """The file names a VQAv2 image may have, tried in this order: COCO 2014's
    ``COCO_{subtype}_{id:012d}.jpg`` (subtype from the questions file, e.g. ``train2014``), COCO
    2017's ``{id:012d}.jpg``, then ``{id}.jpg`` and ``{id}.png``."""
    names = []
    if isinstance(image_id, int) and not isinstance(image_id, bool):
        if subtype:
            names.append(f"COCO_{subtype}_{image_id:012d}.jpg")
        names.append(f"{image_id:012d}.jpg")
    return [*names, f"{image_id}.jpg", f"{image_id}.png"]


def _read_vqa(source: SourceConfig, problem: _Problems, parsed: object) -> list[VQARecord]:
    """VQAv2 (questions file + annotations beside it) or GQA (``{qid: {imageId, question, answer,
    types}}``); one record per question. Image file names: see :func:`_coco_image_names` (VQAv2)
    and ``{imageId}.jpg`` / ``{imageId}.png`` (GQA), under ``source.images``."""
    path, data = _json_source(source, parsed)
    if source.task != "vqa":
        raise DataError(f"'{path}' is a VQA questions file: it holds questions, not captions; use task: vqa")
    if not (_is_vqav2_questions(data) or _is_gqa(data)):
        raise DataError(
            f"'{path}' is not a VQA questions file: expected VQAv2 {{\"questions\": [{{question_id, image_id, "
            f"question}}]}} or GQA {{qid: {{imageId, question, answer}}}}{_vqa_annotations_hint(data)}"
        )
    images = _require_images(source, "vqa")
    items = _vqav2_items(path, data, problem) if _is_vqav2_questions(data) else _gqa_items(path, data, problem)
    found: dict[str, str | None] = {}  # image file per image id: questions share images
    records = []
    for index, where, image_id, names, raw in items:
        if str(image_id) not in found:
            found[str(image_id)] = next((str(images / n) for n in names if (images / n).is_file()), None)
        image = found[str(image_id)]
        if image is None:
            problem("image not found", where, f" (looked for {' or '.join(names)} in '{images}')")
            continue
        record = _vqa_record(raw, image, index, where, problem)
        if record is not None:
            records.append(record)
    if not records:
        raise _no_records("vqa", str(path), 0, problem.report)
    return records


def _vqav2_items(path: Path, data: dict, problem: _Problems) -> list[tuple[int, str, object, list[str], dict]]:
    """(index, where, image_id, image file names, raw record) per question, joined with its annotation."""
    candidates = _vqa_annotation_candidates(path)
    ann_path = next((c for c in candidates if c.is_file()), None)
    if ann_path is None:
        raise DataError(
            f"no annotations (answers) for VQAv2 questions file '{path}': looked for "
            f"{', '.join(c.name for c in candidates)} beside it; put the annotations file there under one of these names"
        )
    ann_data = _load_json(ann_path)
    if not (isinstance(ann_data, dict) and isinstance(ann_data.get("annotations"), list)):
        raise DataError(f"'{ann_path}' is not a VQAv2 annotations file: expected {{\"annotations\": [{{question_id, answers, ...}}]}}")
    annotations = {a.get("question_id"): a for a in ann_data["annotations"] if isinstance(a, dict)}
    subtype = data.get("data_subtype") if isinstance(data.get("data_subtype"), str) else ""
    if not subtype:
        match = re.search(r"(train|val|test-dev|test)\d{4}", path.name)
        subtype = match.group(0) if match else ""
    out = []
    for i, q in enumerate(data["questions"]):
        where = f"{path}:questions[{i}]"
        if not (isinstance(q, dict) and "question" in q and "image_id" in q):
            problem("invalid question entry", where, " (needs 'question_id', 'image_id' and 'question')")
            continue
        ann = annotations.get(q.get("question_id"))
        if ann is None:
            problem("question without annotation", where, f" (question_id {q.get('question_id')!r} is not in '{ann_path.name}')")
            continue
        raw = _vqa_raw(q["question"], ann.get("multiple_choice_answer"), ann.get("answers"), ann.get("answer_type"))
        out.append((i, where, q["image_id"], _coco_image_names(q["image_id"], subtype), raw))
    return out


def _gqa_items(path: Path, data: dict, problem: _Problems) -> list[tuple[int, str, object, list[str], dict]]:
    """(index, where, imageId, image file names, raw record) per GQA question."""
    out = []
    for i, (qid, q) in enumerate(data.items()):
        where = f"{path}:{qid}"
        if not (isinstance(q, dict) and "question" in q and "imageId" in q):
            problem("invalid question entry", where, " (needs 'imageId', 'question' and 'answer')")
            continue
        types = q.get("types") if isinstance(q.get("types"), dict) else {}
        raw = _vqa_raw(q["question"], q.get("answer"), None, types.get("detailed") or types.get("semantic") or "")
        out.append((i, where, q["imageId"], [f"{q['imageId']}.jpg", f"{q['imageId']}.png"], raw))
    return out


# --- Materialized sources: images unpacked once into regular files ---------------------------------


def _materialize(dest: Path, build: Callable[[Path], None]) -> Path:
    """Create folder ``dest`` with ``build(tmp)`` once: built in a temporary sibling and renamed, so
    a crash or a concurrent process never leaves or sees a half-written folder. An existing
    ``dest`` is reused as is (delete it to rebuild)."""
    if (dest / _SAMPLES_FILE).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / _SAMPLES_FILE).is_file():
                raise
            # another process finished the same folder first; it holds the same files
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


class _Manifest:
    """Writes ``samples.jsonl``: one line per sample (``where``, ``image`` relative to the folder or
    absolute, ``raw`` record fields) or per problem found while unpacking (``problem``, ``where``,
    ``detail``), so every later read replays the same records and skips, whatever its on_error."""

    def __init__(self, folder: Path) -> None:
        self._f = (folder / _SAMPLES_FILE).open("w", encoding="utf-8")

    def __enter__(self) -> _Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def sample(self, where: str, image: str | None, raw: dict) -> None:
        self._f.write(json.dumps({"where": where, "image": image, "raw": raw}) + "\n")

    def problem(self, reason: str, where: str, detail: str = "") -> None:
        self._f.write(json.dumps({"problem": reason, "where": where, "detail": detail}) + "\n")


def _manifest_records(folder: Path, task: Task, problem: _Problems, tally: dict[str, int]) -> list:
    """Records of a materialized folder. ``tally["samples"]`` numbers samples across the folders of
    one source (a record's ``index``); ``tally["other"]`` counts samples of the other task."""
    records = []
    with (folder / _SAMPLES_FILE).open(encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            where = entry["where"]
            if "problem" in entry:
                problem(entry["problem"], where, entry["detail"])
                continue
            index = tally["samples"]
            tally["samples"] += 1
            raw = entry["raw"]
            is_caption = any(k in raw for k in _CAPTION_KEYS)
            if not (is_caption or "question" in raw):
                problem("sample has neither captions nor a question", where)
                continue
            if not (is_caption if task == "caption" else "question" in raw):
                tally["other"] += 1
                continue
            if entry["image"] is None:
                problem("sample has no image", where)
                continue
            image = folder / entry["image"]  # an absolute image path stays as it is
            if not image.is_file():
                problem("image not found", where, f" ('{image}')")
                continue
            build = _caption_record if task == "caption" else _vqa_record
            record = build(raw, str(image), index, where, problem)
            if record is not None:
                records.append(record)
    return records


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# --- webdataset tar shards ---------------------------------------------------------------------


def _is_tar(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_TAR_SUFFIXES)


def _expand_pattern(pattern: str) -> list[Path]:
    """Brace ranges and lists (``{000..009}``, ``{a,b}``, as webdataset writes them), then glob."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match:
        body, out = match.group(1), []
        numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if numeric:
            lo, hi = numeric.groups()
            options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            options = body.split(",")
        for option in options:
            out += _expand_pattern(pattern[: match.start()] + option + pattern[match.end():])
        return out
    if any(c in pattern for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern)))]
    return [Path(pattern).expanduser()]


def _shards(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        shards = sorted(c for c in p.iterdir() if _is_tar(c))
    elif p.is_file():
        shards = [p]
    else:
        shards = _expand_pattern(path) if any(c in path for c in _GLOB_CHARS) else []
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise DataError(f"webdataset shard '{missing[0]}' of '{path}' does not exist")
    if not shards:
        raise DataError(
            f"no tar shards at '{path}'; a webdataset source is a .tar file, a folder of .tar files or a "
            "pattern such as 'shards/{000000..000009}.tar'"
        )
    return shards


def _member_key(name: str) -> tuple[str, str] | None:
    """``dir/000123.seg.png`` -> (``dir/000123``, ``seg.png``): the key ends at the first dot of the
    file name, as webdataset groups files into samples; None for names without an extension."""
    match = re.fullmatch(r"((?:.*/)?[^./][^./]*)\.([^/]+)", name)
    return (match.group(1), match.group(2).lower()) if match else None


def _extract_shard(shard: Path, folder: Path) -> None:
    """Unpack a shard's images to ``folder/files/`` and write its manifest (captions from ``.txt``,
    fields from ``.json``); unreadable members are recorded as problems, not raised."""
    samples: dict[str, dict] = {}  # key -> {"image", "raw", "broken"}, in shard order
    with _Manifest(folder) as manifest:
        try:
            _unpack_members(shard, folder, manifest, samples)
        except (PermissionError, FileNotFoundError):
            raise  # a problem of access, not of content: not recorded in the reused folder
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            manifest.problem("unreadable tar shard", str(shard), f" ({exc})")
        for key, sample in samples.items():
            if not sample["broken"]:
                manifest.sample(f"{shard}:{key}", sample["image"], sample["raw"])


def _unpack_members(shard: Path, folder: Path, manifest: _Manifest, samples: dict[str, dict]) -> None:
    """Group the shard's members into ``samples`` by key, writing image members under ``folder``."""
    with tarfile.open(shard, "r:*") as tar:
        while True:
            offset = tar.offset
            try:
                member = tar.next()
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                manifest.problem("unreadable tar member", f"{shard}@{offset}", f" ({exc})")
                break
            if member is None:
                if _trailing_garbage(shard, offset):
                    manifest.problem("unreadable tar member", f"{shard}@{offset}",
                                     " (data after the last readable member: truncated or corrupt)")
                break
            keyed = _member_key(member.name) if member.isfile() else None
            if keyed is None:
                continue
            key, ext = keyed
            where = f"{shard}:{member.name}"
            sample = samples.setdefault(key, {"image": None, "raw": {}, "broken": False})
            is_image = ext in _IMAGE_EXTENSIONS
            if not (is_image or ext in ("txt", "json")) or (is_image and sample["image"]):
                continue
            if member.name.startswith("/") or ".." in member.name.split("/"):
                manifest.problem("unsafe tar member name", where, " (absolute or '..' path)")
                sample["broken"] = True
                continue
            try:
                data = tar.extractfile(member).read()
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                # The data ends early (or, compressed, is corrupt): nothing after it can be read.
                manifest.problem("unreadable tar member", where, f" ({exc})")
                sample["broken"] = True
                break
            if is_image:
                target = folder / "files" / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                sample["image"] = f"files/{member.name}"
            elif ext == "txt":
                sample["raw"].setdefault("caption", data.decode("utf-8", errors="replace"))
            else:
                _merge_sample_json(data, sample, manifest, where)


def _merge_sample_json(data: bytes, sample: dict, manifest: _Manifest, where: str) -> None:
    try:
        fields = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        manifest.problem("invalid JSON", where, f" ({exc})")
        sample["broken"] = True
        return
    if not isinstance(fields, dict):
        manifest.problem("record is not a JSON object", where)
        sample["broken"] = True
        return
    if "question" in fields:
        fields.update(_vqa_raw(fields["question"], fields.get("answer"), fields.get("answers"), fields.get("type", "")))
    sample["raw"].update(fields)


def _trailing_garbage(shard: Path, offset: int) -> bool:
    """Whether an uncompressed tar holds non-zero bytes past where tarfile stopped reading: tarfile
    ends quietly at a truncated or corrupt header, which would otherwise drop samples unseen."""
    if not shard.name.lower().endswith(".tar"):
        return False
    with shard.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            if chunk.strip(b"\0"):
                return True
    return False


def _read_webdataset(source: SourceConfig, problem: _Problems, work_dir: Path) -> list:
    """Samples of every shard, each shard unpacked once to ``work_dir/webdataset/<key>/`` (key: the
    shard's path, size and modification time)."""
    records: list = []
    tally = {"samples": 0, "other": 0}
    for shard in _shards(source.path):
        folder = _materialize(work_dir / "webdataset" / _short_hash(_file_identity(shard)),
                              lambda tmp, shard=shard: _extract_shard(shard, tmp))
        records += _manifest_records(folder, source.task, problem, tally)
    if not records:
        raise _no_records(source.task, f"'{source.path}'", tally["other"], problem.report)
    return records


# --- Hugging Face datasets ---------------------------------------------------------------------

_HF_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "image_path", "file_name", "filepath", "path")
_HF_CAPTION_COLUMNS = ("captions", "caption", "text", "sentences")
_HF_ANSWER_COLUMNS = ("multiple_choice_answer", "answer")
_HF_TYPE_COLUMNS = ("answer_type", "type", "question_type")
_HF_DATA_FILES = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


def _hf_local_hint(name: str) -> str:
    return (
        f"to read '{name}' offline, save it once where the Hub is reachable with "
        f"datasets.load_dataset('{name}').save_to_disk(DIR) and set path: DIR, format: hf_disk "
        "(or point path at local data files with format: hf)"
    )


def _open_hf(source: SourceConfig, fmt: str):
    """The rows of an hf / hf_disk source: a ``datasets.Dataset`` or (streaming) ``IterableDataset``."""
    import datasets

    path = Path(source.path).expanduser()
    local = path.exists()
    try:
        if fmt == "hf_disk":
            if not local:
                raise DataError(f"hf_disk source '{source.path}' does not exist; expected a folder written by save_to_disk")
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if source.split not in ds:
                    raise DataError(
                        f"'{source.path}' has no split '{source.split}'; set split to one of {sorted(ds)}")
                ds = ds[source.split]
            return ds.to_iterable_dataset() if source.streaming else ds
        if local and path.is_file():
            builder = _HF_DATA_FILES.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"cannot read '{source.path}' with datasets: use a {', '.join(_HF_DATA_FILES)} file or a folder")
            return datasets.load_dataset(builder, data_files={source.split: str(path)}, split=source.split,
                                         streaming=source.streaming)
        return datasets.load_dataset(str(path) if local else source.path, split=source.split,
                                     streaming=source.streaming)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many kinds (connection, not found, bad split): name the source
        reason = f"{type(exc).__name__}: {exc}"
        if local:
            raise DataError(f"cannot load Hugging Face dataset '{source.path}' (split '{source.split}'): {reason}") from exc
        raise DataError(
            f"cannot load Hugging Face dataset '{source.path}' (split '{source.split}'): {reason}; it is not a "
            f"local path, so it was looked up on the Hub; {_hf_local_hint(source.path)}"
        ) from exc


def _hf_columns(ds) -> dict[str, object]:
    """Which columns hold the image, captions, question, answer(s) and type; error if none fit."""
    import datasets

    names = list(ds.column_names or [])
    if not names:  # a stream without declared features: look at the first row
        names = list(next(iter(ds), {}))
    features = ds.features or {}
    image = next((n for n in names if isinstance(features.get(n), datasets.Image)), None)
    image = image or next((n for n in _HF_IMAGE_COLUMNS if n in names), None)
    cols = {
        "image": image,
        "captions": [n for n in _HF_CAPTION_COLUMNS if n in names],
        "question": "question" if "question" in names else None,
        "answer": next((n for n in _HF_ANSWER_COLUMNS if n in names), None),
        "answers": "answers" if "answers" in names else None,
        "type": next((n for n in _HF_TYPE_COLUMNS if n in names), None),
    }
    if image is None or not (cols["captions"] or cols["question"]):
        raise DataError(
            f"cannot find the columns to read (columns: {names}): need an image column (an Image feature or one "
            f"of {list(_HF_IMAGE_COLUMNS)}) and caption ({list(_HF_CAPTION_COLUMNS)}) or question + answer columns"
        )
    return cols


def _caption_texts(value: object) -> object:
    """Captions as a list of strings; ``sentences`` may be ``[{"raw": ...}]`` (Karpathy splits)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and isinstance(value.get("raw"), list):
        value = value["raw"]
    if isinstance(value, list):
        return [v.get("raw", v.get("text")) if isinstance(v, dict) else v for v in value]
    return value


def _hf_row_raw(row: dict, cols: dict) -> dict:
    raw: dict = {}
    if cols["captions"]:
        texts: list = []
        for name in cols["captions"]:
            value = _caption_texts(row[name])
            if not isinstance(value, list):
                raw["captions"] = value  # malformed: _caption_record reports it
                break
            texts += value
        else:
            raw["captions"] = list(dict.fromkeys(texts)) if all(isinstance(t, str) for t in texts) else texts
    if cols["question"]:
        raw.update(_vqa_raw(row[cols["question"]], row[cols["answer"]] if cols["answer"] else None,
                            row[cols["answers"]] if cols["answers"] else None,
                            row[cols["type"]] if cols["type"] else ""))
    return raw


def _hf_image(value: object, folder: Path, base: Path | None) -> tuple[str | None, str, str]:
    """One row's image as a file: decoded and written as ``images/<hash of its bytes>.png`` (rows
    with the same image share a file), or an existing file a path column names (relative to the
    dataset's folder). Returns (image, problem reason, detail); the reason is "" when it worked."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, str):
        data, path = None, value
    elif isinstance(value, Image.Image):
        data, path = None, None
    else:
        return None, "missing image", f" (image column holds {type(value).__name__})"
    if data is None and path is not None:
        p = Path(path).expanduser()
        p = p if p.is_absolute() or base is None else base / p
        return (str(p.resolve()), "", "") if p.is_file() else (None, "image not found", f" ('{path}')")
    try:
        if isinstance(value, Image.Image):
            img = value.convert("RGB")
            name = hashlib.sha256(f"{img.size}".encode() + img.tobytes()).hexdigest()[:20]
        else:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                img, name = opened.convert("RGB"), hashlib.sha256(data).hexdigest()[:20]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return None, "unreadable image", f" ({exc})"
    target = folder / "images" / f"{name}.png"
    if not target.is_file():
        target.parent.mkdir(exist_ok=True)
        img.save(target, format="PNG")
    return f"images/{name}.png", "", ""


def _hf_identity(source: SourceConfig, fmt: str, ds) -> str:
    """What the materialized folder depends on: the source, its rows, and (local) its files."""
    path = Path(source.path).expanduser()
    files = []
    if path.exists():
        for f in sorted([path] if path.is_file() else path.rglob("*")):
            if f.is_file():
                st = f.stat()
                files.append([str(f.relative_to(path) if f != path else f.name), st.st_size, st.st_mtime_ns])
    return json.dumps({
        "format": fmt, "path": str(path.resolve()) if path.exists() else source.path, "split": source.split,
        "rows": source.max_records, "fingerprint": getattr(ds, "_fingerprint", None), "files": files,
    }, sort_keys=True)


def _read_hf(source: SourceConfig, fmt: str, problem: _Problems, work_dir: Path) -> list:
    """Rows of a Hugging Face dataset; images are written once to ``work_dir/hf/<key>/images/``."""
    import datasets

    if source.streaming and source.max_records <= 0:
        raise DataError(
            f"streaming source '{source.path}' needs max_records > 0 (how many rows to read); set max_records")
    ds = _open_hf(source, fmt)
    cols = _hf_columns(ds)
    if isinstance((ds.features or {}).get(cols["image"]), datasets.Image):
        ds = ds.cast_column(cols["image"], datasets.Image(decode=False))  # decode here, one bad row at a time
    if source.max_records > 0:
        ds = ds.take(source.max_records) if source.streaming else ds.select(range(min(source.max_records, len(ds))))
    path = Path(source.path).expanduser()
    base = (path if path.is_dir() else path.parent) if path.exists() else None

    def build(folder: Path) -> None:
        with _Manifest(folder) as manifest:
            for i, row in enumerate(ds):
                where = f"{source.path}[{source.split}]:{i}"
                image, reason, detail = _hf_image(row[cols["image"]], folder, base)
                if reason:
                    manifest.problem(reason, where, detail)
                    continue
                manifest.sample(where, image, _hf_row_raw(row, cols))

    folder = _materialize(work_dir / "hf" / _short_hash(_hf_identity(source, fmt, ds)), build)
    tally = {"samples": 0, "other": 0}
    records = _manifest_records(folder, source.task, problem, tally)
    if not records:
        raise _no_records(source.task, f"'{source.path}'", tally["other"], problem.report)
    return records
