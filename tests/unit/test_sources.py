"""Readers: valid splits read into records; every bad record stops with a message that names
it and the fix, or is skipped and counted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from vljepa.data.formats import DataError, SkipReport
from vljepa.data.readers import load_image, read_split


def _image(path: Path, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), 128).save(path)


def _split(root: Path, lines: list, file: str = "metadata.jsonl", images=("images/a.png", "images/b.png")) -> Path:
    """A split folder with the given images and record lines (dicts are JSON-encoded)."""
    for name in images:
        _image(root / name)
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    (root / file).write_text(text)
    return root


def test_reads_caption_records(tmp_path):
    root = _split(
        tmp_path,
        [
            {"file_name": "images/a.png", "captions": [" a red circle ", "one red circle"], "label": "red circle"},
            {"file_name": "images/b.png", "caption": "a blue square"},
            "",
            {"file_name": "images/b.png", "text": "a blue square again"},
        ],
    )
    records, report = read_split(root, "caption")
    assert report.total == 0
    assert [r.captions for r in records] == [("a red circle", "one red circle"), ("a blue square",), ("a blue square again",)]
    assert records[0].label == "red circle" and records[1].label is None
    assert records[0].image == str(tmp_path.resolve() / "images/a.png")
    assert [r.index for r in records] == [0, 1, 3]


def test_reads_vqa_from_metadata_and_questions(tmp_path):
    _split(tmp_path, [{"file_name": "images/a.png", "captions": ["a red circle"]}])
    _split(
        tmp_path,
        [
            {"file_name": "images/a.png", "question": "what color is it?", "answer": "red", "type": "color"},
            {"file_name": "images/b.png", "question": "how many?", "answer": "two", "answers": ["2"]},
        ],
        file="questions.jsonl",
    )
    records, report = read_split(tmp_path, "vqa")
    assert report.total == 0 and len(records) == 2
    assert records[0].answers == ("red",) and records[0].type == "color"
    assert records[1].answers == ("two", "2") and records[1].type == ""
    captions, _ = read_split(tmp_path, "caption")
    assert len(captions) == 1  # questions.jsonl is not read for captions


def test_missing_folder_and_missing_metadata(tmp_path):
    with pytest.raises(DataError, match="does not exist.*metadata.jsonl"):
        read_split(tmp_path / "nope", "caption")
    with pytest.raises(DataError, match="no metadata.jsonl in"):
        read_split(tmp_path, "caption")
    with pytest.raises(DataError, match="no metadata.jsonl or questions.jsonl"):
        read_split(tmp_path, "vqa", on_error="skip")


def test_wrong_task_says_what_was_found(tmp_path):
    _split(tmp_path, [{"file_name": "images/a.png", "question": "q?", "answer": "a"}])
    with pytest.raises(DataError, match="no usable caption records.*found 1 question records \\(use task=vqa\\)"):
        read_split(tmp_path, "caption")
    other = _split(tmp_path / "c", [{"file_name": "images/a.png", "captions": ["x"]}])
    with pytest.raises(DataError, match="no usable question records.*found 1 caption records"):
        read_split(other, "vqa")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"file_name": "images/a.png", "captions": ["x"]', "invalid JSON"),
        ({"captions": ["x"]}, "missing file_name"),
        ({"file_name": "images/gone.png", "captions": ["x"]}, "image not found"),
        ({"file_name": "images/a.png", "captions": [""]}, "empty caption"),
        ({"file_name": "images/a.png"}, "record has neither captions nor a question"),
        ('["images/a.png", "x"]', "record is not a JSON object"),
    ],
)
def test_bad_caption_record_stops_or_is_counted(tmp_path, line, reason):
    good = {"file_name": "images/b.png", "captions": ["a good one"]}
    root = _split(tmp_path, [good, line, good])
    with pytest.raises(DataError) as err:
        read_split(root, "caption")
    message = str(err.value)
    assert f"metadata.jsonl:2: {reason}" in message
    assert "set data.on_error=skip to skip bad records" in message
    records, report = read_split(root, "caption", on_error="skip")
    assert len(records) == 2
    assert report.counts[reason] == 1
    assert str(root.resolve() / "metadata.jsonl") + ":2" in report.examples[reason]


def test_missing_image_message_names_the_file(tmp_path):
    root = _split(tmp_path, [{"file_name": "images/gone.png", "captions": ["x"]}, {"file_name": "images/a.png", "captions": ["y"]}])
    with pytest.raises(DataError, match=r"'images/gone.png' is not in"):
        read_split(root, "caption")


def test_empty_captions_are_dropped_and_counted(tmp_path):
    root = _split(
        tmp_path,
        [
            {"file_name": "images/a.png", "captions": ["", "a red circle", "  "]},
            {"file_name": "images/b.png", "captions": [""]},
        ],
    )
    records, report = read_split(root, "caption", on_error="skip")
    assert [r.captions for r in records] == [("a red circle",)]
    assert report.counts == {"empty caption": 3, "no non-empty caption": 1}
    assert report.total == 4


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"file_name": "images/a.png", "question": " ", "answer": "red"}, "empty question"),
        ({"file_name": "images/a.png", "question": "what color?", "answer": ""}, "empty answer"),
        ({"file_name": "images/a.png", "question": "what color?"}, "empty answer"),
    ],
)
def test_bad_vqa_record(tmp_path, record, reason):
    good = {"file_name": "images/b.png", "question": "what?", "answer": "that"}
    root = _split(tmp_path, [good, record], file="questions.jsonl")
    with pytest.raises(DataError, match=f"questions.jsonl:2: {reason}.*data.on_error=skip"):
        read_split(root, "vqa")
    records, report = read_split(root, "vqa", on_error="skip")
    assert len(records) == 1 and report.counts == {reason: 1}


def test_all_records_skipped_is_an_error(tmp_path):
    root = _split(tmp_path, [{"file_name": "images/gone.png", "captions": ["x"]}])
    with pytest.raises(DataError, match="(?s)no usable caption records.*found 0 question records; skipped 1:.*image not found x1"):
        read_split(root, "caption", on_error="skip")


def test_invalid_on_error(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        read_split(tmp_path, "caption", on_error="ignore")
    with pytest.raises(ValueError, match="on_error"):
        load_image(str(tmp_path / "x.png"), on_error="ignore")


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    _image(path, mode="L")
    img = load_image(str(path))
    assert img.mode == "RGB" and img.size == (8, 8)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_load_image_bad_file(tmp_path, damage):
    path = tmp_path / "bad.png"
    if damage != "missing":
        Image.effect_noise((64, 64), 50).convert("RGB").save(path)  # noise: not compressible
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not an image" * 10)
    with pytest.raises(DataError) as err:
        load_image(str(path))
    message = str(err.value)
    assert message.startswith(f"cannot read image '{path}' (")
    assert message.endswith("); set data.on_error=skip to skip bad records")
    assert load_image(str(path), on_error="skip") is None


def test_skip_report():
    report = SkipReport()
    assert report.total == 0 and report.summary() == "skipped 0"
    for i in range(7):
        report.add("image not found", f"m.jsonl:{i + 1}")
    report.add("invalid JSON", "m.jsonl:9")
    assert report.total == 8
    summary = report.summary()
    assert summary.splitlines()[0] == "skipped 8:"
    assert "image not found x7 (m.jsonl:1, m.jsonl:2, m.jsonl:3, m.jsonl:4, m.jsonl:5, ...)" in summary
    assert "invalid JSON x1 (m.jsonl:9)" in summary
    d = report.to_dict()
    assert d["total"] == 8 and d["counts"] == {"image not found": 7, "invalid JSON": 1}
    assert json.loads(json.dumps(d)) == d


def test_source_types_filter_keeps_only_those_questions(tmp_path):
    from vljepa.config import load_config
    from vljepa.data.readers import read_source

    _split(tmp_path, [{"file_name": "images/a.png", "captions": ["a red circle"]}])
    _split(tmp_path, [
        {"file_name": "images/a.png", "question": "what color is it?", "answer": "red", "type": "color"},
        {"file_name": "images/a.png", "question": "is it left of b?", "answer": "yes", "type": "relation"},
        {"file_name": "images/b.png", "question": "is b left of a?", "answer": "no", "type": "relation"},
    ], file="questions.jsonl")
    cfg = load_config(None, [f"data.sources=[{{path: '{tmp_path}', task: vqa, types: [relation]}}]"])
    records, _ = read_source(cfg.data.sources[0])
    assert [r.answer for r in records] == ["yes", "no"] and {r.type for r in records} == {"relation"}
    with pytest.raises(DataError, match=r"no question has a type in \['count'\]; its types are \['color', 'relation'\]"):
        read_source(dataclasses.replace(cfg.data.sources[0], types=["count"]))
    with pytest.raises(DataError, match="needs task: vqa"):
        read_source(dataclasses.replace(cfg.data.sources[0], task="caption"))


# --- bad bytes and escaping paths ---------------------------------------------------------------------

NOT_UTF8_FIX = "re-save the file as UTF-8, or set data.on_error=skip to skip such lines"


@pytest.mark.parametrize(("file", "task", "good"), [
    ("metadata.jsonl", "caption", {"file_name": "images/b.png", "captions": ["a good one"]}),
    ("questions.jsonl", "vqa", {"file_name": "images/b.png", "question": "what?", "answer": "that"}),
])
def test_line_that_is_not_utf8_stops_or_is_counted(tmp_path, file, task, good):
    root = _split(tmp_path, [good, good], file=file)
    lines = (root / file).read_bytes().splitlines(keepends=True)
    bad = b'{"file_name": "images/a.png", "captions": ["caf\xe9"]}\n'  # Latin-1, not UTF-8
    (root / file).write_bytes(b"\xef\xbb\xbf" + lines[0] + bad + lines[1])  # a BOM on line 1 is fine
    with pytest.raises(DataError) as err:
        read_split(root, task)
    position = bad.index(b"\xe9") + 1
    assert str(err.value) == (f"{root.resolve() / file}:2: line is not UTF-8 (invalid byte 0xe9 at position {position} "
                              f"of the line); {NOT_UTF8_FIX}")
    records, report = read_split(root, task, on_error="skip")
    assert [r.index for r in records] == [0, 2]
    assert report.counts == {"line is not UTF-8": 1}
    assert report.examples["line is not UTF-8"] == [f"{root.resolve() / file}:2"]


def _outside_image(tmp_path: Path) -> Path:
    """An image outside the split folder ``tmp_path / "split"``, which a record must not reach."""
    outside = tmp_path / "outside" / "secret.png"
    _image(outside)
    return outside


@pytest.mark.parametrize("file_name", [
    "../../../../etc/passwd",
    "../outside/secret.png",
    "images/../../outside/secret.png",
    "ABSOLUTE",  # the outside image's absolute path
    "linked/secret.png",  # through a folder symlink that leads out of the split
])
def test_image_path_that_escapes_the_split_stops_or_is_counted(tmp_path, file_name):
    outside = _outside_image(tmp_path)
    file_name = str(outside) if file_name == "ABSOLUTE" else file_name
    good = {"file_name": "images/b.png", "captions": ["a good one"]}
    root = _split(tmp_path / "split", [good, {"file_name": file_name, "captions": ["x"]}, good])
    (root / "linked").symlink_to(outside.parent, target_is_directory=True)
    with pytest.raises(DataError) as err:
        read_split(root, "caption")
    assert str(err.value) == (
        f"{root.resolve() / 'metadata.jsonl'}:2: image path escapes the split folder ('{file_name}' is outside "
        f"'{root.resolve()}'); give a path inside the split folder, or set data.on_error=skip to skip such records")
    records, report = read_split(root, "caption", on_error="skip")
    assert [r.index for r in records] == [0, 2]
    assert report.counts == {"image path escapes the split folder": 1}


def test_image_paths_that_stay_inside_are_read(tmp_path):
    outside = _outside_image(tmp_path)
    root = _split(tmp_path / "split", [
        {"file_name": "images/../images/a.png", "captions": ["dots that stay inside"]},
        {"file_name": str(tmp_path.resolve() / "split" / "images" / "b.png"), "captions": ["absolute, inside"]},
        {"file_name": "images/linked.png", "captions": ["a file symlink, as the converters write"]},
    ])
    (root / "images" / "linked.png").symlink_to(outside)
    records, report = read_split(root, "caption")
    assert report.total == 0
    images = root.resolve() / "images"
    assert [r.image for r in records] == [str(images / "a.png"), str(images / "b.png"), str(images / "linked.png")]
