"""VQA questions JSON: VQAv2 (questions file, annotations beside it) or GQA (``{qid: {imageId, ...}}``)."""

from __future__ import annotations

import re
from pathlib import Path

from vljepa.config import SourceConfig
from vljepa.data.formats import DataError, VQARecord
from vljepa.data.readers.common import (
    Problems,
    first,
    images_folder,
    inside,
    json_source,
    load_json,
    no_records,
    report_escape,
    vqa_raw,
    vqa_record,
)

# (index, where, image id, candidate image file names, raw record) per question
_Item = tuple[int, str, object, list[str], dict]


def is_vqav2_questions(data: object) -> bool:
    """Whether parsed JSON looks like a VQAv2 questions file."""
    return isinstance(data, dict) and isinstance(data.get("questions"), list)


def is_gqa(data: object) -> bool:
    """Whether parsed JSON looks like a GQA questions file."""
    if not isinstance(data, dict) or not data:
        return False
    entry = next(iter(data.values()))
    return isinstance(entry, dict) and "question" in entry and "imageId" in entry


def annotations_hint(data: object) -> str:
    """A hint for error messages when ``data`` is a VQAv2 annotations file, else ""."""
    entry = first(data.get("annotations")) if isinstance(data, dict) else None
    if isinstance(entry, dict) and "multiple_choice_answer" in entry:
        return " -- this is a VQAv2 annotations file: point path at the questions file, the annotations are found beside it"
    return ""


def read(source: SourceConfig, problem: Problems, *, parsed: object, work_dir: Path | None) -> list[VQARecord]:
    """The ``vqa`` reader: one record per question. Image file names: see :func:`_coco_image_names`
    (VQAv2) and ``{imageId}.jpg`` / ``{imageId}.png`` (GQA), under ``source.images``."""
    path, data = json_source(source, parsed)
    if source.task != "vqa":
        raise DataError(f"'{path}' is a VQA questions file: it holds questions, not captions; use task: vqa")
    if not (is_vqav2_questions(data) or is_gqa(data)):
        raise DataError(
            f"'{path}' is not a VQA questions file: expected VQAv2 {{\"questions\": [{{question_id, image_id, "
            f"question}}]}} or GQA {{qid: {{imageId, question, answer}}}}{annotations_hint(data)}"
        )
    images = images_folder(source, "vqa")
    items = _vqav2_items(path, data, problem) if is_vqav2_questions(data) else _gqa_items(path, data, problem)
    found: dict[str, tuple[Path | None, str]] = {}  # image file per image id: questions share images
    records = []
    for index, where, image_id, names, raw in items:
        if str(image_id) not in found:
            found[str(image_id)] = _find_image(images, names)
        image, escaping = found[str(image_id)]
        if escaping:
            report_escape(problem, where, escaping, "images folder", images)
            continue
        if image is None:
            problem("image not found", where, f" (looked for {' or '.join(names)} in '{images}')")
            continue
        record = vqa_record(raw, str(image), index, where, problem)
        if record is not None:
            records.append(record)
    if not records:
        raise no_records("vqa", str(path), 0, problem.report)
    return records


def _find_image(images: Path, names: list[str]) -> tuple[Path | None, str]:
    """(the first of ``names`` that is a file under ``images`` or None, the first name that leads
    outside ``images`` or "")."""
    paths = [inside(images, n) for n in names]
    escaping = next((n for n, p in zip(names, paths) if p is None), "")
    return (None if escaping else next((p for p in paths if p.is_file()), None)), escaping


def _annotation_candidates(questions: Path) -> list[Path]:
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


def _vqav2_items(path: Path, data: dict, problem: Problems) -> list[_Item]:
    """Each question joined with its annotation."""
    candidates = _annotation_candidates(path)
    ann_path = next((c for c in candidates if c.is_file()), None)
    if ann_path is None:
        raise DataError(
            f"no annotations (answers) for VQAv2 questions file '{path}': looked for "
            f"{', '.join(c.name for c in candidates)} beside it; put the annotations file there under one of these names"
        )
    ann_data = load_json(ann_path)
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
        raw = vqa_raw(q["question"], ann.get("multiple_choice_answer"), ann.get("answers"), ann.get("answer_type"))
        out.append((i, where, q["image_id"], _coco_image_names(q["image_id"], subtype), raw))
    return out


def _gqa_items(path: Path, data: dict, problem: Problems) -> list[_Item]:
    """Each GQA question."""
    out = []
    for i, (qid, q) in enumerate(data.items()):
        where = f"{path}:{qid}"
        if not (isinstance(q, dict) and "question" in q and "imageId" in q):
            problem("invalid question entry", where, " (needs 'imageId', 'question' and 'answer')")
            continue
        types = q.get("types") if isinstance(q.get("types"), dict) else {}
        raw = vqa_raw(q["question"], q.get("answer"), None, types.get("detailed") or types.get("semantic") or "")
        out.append((i, where, q["imageId"], [f"{q['imageId']}.jpg", f"{q['imageId']}.png"], raw))
    return out
