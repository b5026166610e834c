"""COCO captions JSON: ``images`` [{id, file_name}] + ``annotations`` [{image_id, caption}]."""

from __future__ import annotations

from pathlib import Path

from vljepa.config import SourceConfig
from vljepa.data.formats import CaptionRecord, DataError
from vljepa.data.readers.common import (
    Problems,
    caption_record,
    first,
    images_folder,
    inside,
    json_source,
    no_records,
    report_escape,
)


def is_coco(data: object) -> bool:
    """Whether parsed JSON looks like a COCO captions file."""
    if not (isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)):
        return False
    entry = first(data["annotations"])
    return entry is None or (isinstance(entry, dict) and "caption" in entry)


def read(source: SourceConfig, problem: Problems, *, parsed: object, work_dir: Path | None) -> list[CaptionRecord]:
    """The ``coco`` reader: one record per captioned image holding all its captions, in the order
    of ``images``; image files under ``source.images``."""
    path, data = json_source(source, parsed)
    if source.task != "caption":
        raise DataError(f"'{path}' is a COCO captions file: it holds captions, not questions; use task: caption")
    if not is_coco(data):
        raise DataError(
            f"'{path}' is not a COCO captions file: expected {{\"images\": [{{id, file_name}}], "
            "\"annotations\": [{image_id, caption}]}"
        )
    images = images_folder(source, "coco")
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
        image = inside(images, entry["file_name"])
        if image is None:
            report_escape(problem, where, entry["file_name"], "images folder", images)
            continue
        if not image.is_file():
            problem("image not found", where, f" ('{entry['file_name']}' is not in '{images}')")
            continue
        record = caption_record({"captions": texts}, str(image), i, where, problem)
        if record is not None:
            records.append(record)
    if not records:
        raise no_records("caption", str(path), 0, problem.report)
    return records
