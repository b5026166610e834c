"""Readers: the one path every dataset goes through.

A split folder (format in :mod:`vljepa.data.formats`) is read into a list of records with
:func:`read_split`; images are opened with :func:`load_image`, and a record's image or clip
with :func:`load_visual` (videos, frames folders and frame lists: :mod:`~vljepa.data.readers.video`).
They take ``on_error``: ``"stop"`` raises :class:`DataError` at the first bad record, ``"skip"`` leaves it out and
counts it in a :class:`SkipReport`, so nothing is dropped without a trace.

:func:`read_source` reads one configured source (:class:`vljepa.config.SourceConfig`) of any
format into the same records, with the same ``on_error`` policy; one module per format:

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
files under ``work_dir`` (see :mod:`vljepa.data.readers.materialized`). Every image path a record
gives must stay inside the folder it is relative to; files must be UTF-8.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vljepa.config import SourceConfig
from vljepa.data.formats import CaptionRecord, DataError, SkipReport, VQARecord
from vljepa.data.readers import coco, hf, imagefolder, vqa, webdataset
from vljepa.data.readers.common import OnError, Problems, check_on_error, check_task, load_image, load_json
from vljepa.data.readers.imagefolder import METADATA_FILE, QUESTIONS_FILE, read_split
from vljepa.data.readers.video import (
    VideoInfo,
    iter_frames,
    load_clip,
    load_visual,
    read_clip,
    read_frame_list,
    video_info,
    write_video,
)

__all__ = ["detect_format", "iter_frames", "load_clip", "load_image", "load_visual", "read_clip", "read_frame_list",
           "read_source", "read_split", "READERS", "VideoInfo", "video_info", "write_video"]

# ``reader(source, problem, parsed=..., work_dir=...) -> records``; ``parsed`` is the JSON that
# format detection already read, or None.
Reader = Callable[..., list]
READERS: dict[str, Reader] = {
    "imagefolder": imagefolder.read,
    "coco": coco.read,
    "vqa": vqa.read,
    "webdataset": webdataset.read,
    "hf": hf.read_hub_or_files,
    "hf_disk": hf.read_disk,
}


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
    check_on_error(on_error)
    check_task(source.task)
    if not source.path:
        raise DataError("a data source has an empty path; set path to a folder, file or dataset name")
    fmt, parsed = (source.format, None) if source.format != "auto" else _detect(source.path)
    if fmt not in READERS:
        raise DataError(
            f"data source '{source.path}': unknown format '{fmt}'; use one of auto, {', '.join(READERS)}"
        )
    problem = Problems(on_error)
    records = READERS[fmt](source, problem, parsed=parsed, work_dir=work_dir)
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
        if any(webdataset.is_tar(c) for c in p.iterdir()):
            return "webdataset", None
        return "hf", None
    if p.is_file():
        if webdataset.is_tar(p):
            return "webdataset", None
        if p.suffix.lower() == ".json":
            data = load_json(p)
            if coco.is_coco(data):
                return "coco", data
            if vqa.is_vqav2_questions(data) or vqa.is_gqa(data):
                return "vqa", data
            raise DataError(
                f"cannot tell the format of '{p}': a JSON source must be COCO captions ('images' + "
                "'annotations' with 'caption'), VQAv2 questions ('questions') or GQA questions "
                f"({{qid: {{imageId, question, answer}}}}){vqa.annotations_hint(data)}; or set the "
                "source's format explicitly"
            )
        return "hf", None
    if any(c in path for c in webdataset.GLOB_CHARS):
        shards = webdataset.expand_pattern(path)
        if shards and all(webdataset.is_tar(s) for s in shards):
            return "webdataset", None
    if path.startswith(("/", "./", "../", "~")) or p.suffix.lower() in (".json", ".jsonl", ".tar", ".parquet", ".csv"):
        raise DataError(f"data source '{path}' does not exist; check the path (relative paths start at the working folder)")
    return "hf", None
