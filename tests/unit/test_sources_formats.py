"""Every source format (COCO, VQAv2, GQA, webdataset shards, Hugging Face datasets) reads into the
same records as a split folder, with the same on_error policy; auto-detection; containers are
unpacked once; the converters in scripts/ round-trip."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from vljepa.config import SourceConfig
from vljepa.data.formats import CaptionRecord, DataError, VQARecord
from vljepa.data.readers import detect_format, read_source, read_split

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
FIX = "set data.on_error=skip to skip bad records"


def _image(path: Path, color=(200, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)  # the format follows the suffix
    return path


def _png_bytes(color=(0, 0, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _read(tmp_path: Path, on_error: str = "stop", **kw):
    return read_source(SourceConfig(**kw), on_error=on_error, work_dir=tmp_path / "work")


# --- COCO ------------------------------------------------------------------------------------------


def _coco(root: Path, extra_annotations=(), missing_image=False) -> Path:
    for name in ["a.jpg", "b.jpg", "c.jpg"]:
        if not (missing_image and name == "b.jpg"):
            _image(root / "images" / name)
    return _json(root / "captions.json", {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"},
                   {"id": 3, "file_name": "c.jpg"}, {"id": 4, "file_name": "uncaptioned.jpg"}],
        "annotations": [{"image_id": 1, "id": 10, "caption": "A red cube."},
                        {"image_id": 2, "id": 11, "caption": "A blue ball."},
                        {"image_id": 1, "id": 12, "caption": " a cube that is red "},
                        {"image_id": 3, "id": 13, "caption": "Two things."}, *extra_annotations],
    })


def test_coco_one_record_per_image_with_all_captions(tmp_path):
    ann = _coco(tmp_path)
    records, report = _read(tmp_path, path=str(ann), format="coco", images=str(tmp_path / "images"))
    assert report.total == 0
    assert [r.captions for r in records] == [("A red cube.", "a cube that is red"), ("A blue ball.",), ("Two things.",)]
    assert records[0].image == str((tmp_path / "images" / "a.jpg").resolve())
    assert [r.index for r in records] == [0, 1, 2]
    assert all(isinstance(r, CaptionRecord) for r in records)


def test_coco_needs_its_images_folder(tmp_path):
    ann = _coco(tmp_path)
    with pytest.raises(DataError, match=r"coco source '.*captions.json' needs the folder its images live in: set images"):
        _read(tmp_path, path=str(ann), format="coco")
    with pytest.raises(DataError, match="images folder '.*nope' of coco source .* does not exist"):
        _read(tmp_path, path=str(ann), format="coco", images=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="COCO captions file: it holds captions, not questions; use task: caption"):
        _read(tmp_path, path=str(ann), format="coco", images=str(tmp_path / "images"), task="vqa")


@pytest.mark.parametrize(("bad", "reason", "where"), [
    ({"missing_image": True}, "image not found", "captions.json:images[1]"),
    ({"extra_annotations": [{"image_id": 99, "caption": "ghost"}]}, "caption of an unknown image_id", "annotations[4]"),
    ({"extra_annotations": [{"image_id": 3, "caption": "   "}]}, "empty caption", "captions.json:images[2]"),
    ({"extra_annotations": [{"image_id": 3, "caption": 7}]}, "caption is not a string", "annotations[4]"),
])
def test_coco_bad_record_stops_or_is_counted(tmp_path, bad, reason, where):
    ann = _coco(tmp_path, **bad)
    kw = dict(path=str(ann), format="coco", images=str(tmp_path / "images"))
    with pytest.raises(DataError) as err:
        _read(tmp_path, **kw)
    assert f"{where}: {reason}" in str(err.value) and FIX in str(err.value)
    records, report = _read(tmp_path, "skip", **kw)
    assert report.counts == {reason: 1}
    assert len(records) == (2 if reason == "image not found" else 3)


# --- VQAv2 and GQA ----------------------------------------------------------------------------------


def _vqav2(root: Path, *, annotations_name="v2_mscoco_val2014_annotations.json", drop_image=False) -> Path:
    _image(root / "coco" / "COCO_val2014_000000000042.jpg")
    if not drop_image:
        _image(root / "coco" / "7.jpg")  # the fallback name
    questions = _json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"data_subtype": "val2014", "questions": [
        {"question_id": 420, "image_id": 42, "question": "What color is the cube?"},
        {"question_id": 421, "image_id": 42, "question": "Is it big?"},
        {"question_id": 70, "image_id": 7, "question": "How many balls?"},
    ]})
    human = ["red", "red", "dark red", "red", "maroon", "dark red", "red", "red", "red", "red"]
    _json(root / annotations_name, {"annotations": [
        {"question_id": 420, "image_id": 42, "multiple_choice_answer": "red", "answer_type": "other",
         "question_type": "what color is the", "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(human)]},
        {"question_id": 421, "image_id": 42, "multiple_choice_answer": "yes", "answer_type": "yes/no",
         "answers": [{"answer": "no"}, {"answer": "yes"}, {"answer": "yes"}]},
        {"question_id": 70, "image_id": 7, "answer_type": "number", "answers": [{"answer": "2"}, {"answer": "3"}, {"answer": "3"}]},
    ]})
    return questions


def test_vqav2_joins_questions_and_annotations(tmp_path):
    questions = _vqav2(tmp_path)
    records, report = _read(tmp_path, path=str(questions), format="vqa", images=str(tmp_path / "coco"), task="vqa")
    assert report.total == 0 and all(isinstance(r, VQARecord) for r in records)
    first, second, third = records
    assert first.image.endswith("COCO_val2014_000000000042.jpg") and third.image.endswith("/7.jpg")
    assert (first.question, first.answer, first.answers, first.type) == (
        "What color is the cube?", "red", ("red", "dark red", "maroon"), "other")
    # the multiple-choice answer wins over the majority; without one, the majority is the answer
    assert (second.answer, second.answers, second.type) == ("yes", ("yes", "no"), "yes/no")
    assert (third.answer, third.answers) == ("3", ("3", "2"))


def test_vqav2_annotations_by_simple_name_and_errors(tmp_path):
    questions = _vqav2(tmp_path, annotations_name="elsewhere.json")
    kw = dict(path=str(questions), format="vqa", images=str(tmp_path / "coco"), task="vqa")
    with pytest.raises(DataError, match=r"no annotations \(answers\) for VQAv2 questions file .* looked for "
                                        r"v2_mscoco_val2014_annotations.json, v2_OpenEnded_mscoco_val2014_annotations.json, annotations.json"):
        _read(tmp_path, **kw)
    os.rename(tmp_path / "elsewhere.json", tmp_path / "annotations.json")
    assert len(_read(tmp_path, **kw)[0]) == 3
    with pytest.raises(DataError, match="VQA questions file: it holds questions, not captions; use task: vqa"):
        _read(tmp_path, **{**kw, "task": "caption"})
    with pytest.raises(DataError, match="vqa source .* needs the folder its images live in"):
        _read(tmp_path, **{**kw, "images": ""})


def test_vqav2_missing_image_names_the_files_it_tried(tmp_path):
    questions = _vqav2(tmp_path, drop_image=True)
    kw = dict(path=str(questions), format="vqa", images=str(tmp_path / "coco"), task="vqa")
    with pytest.raises(DataError, match=r"questions\[2\]: image not found \(looked for COCO_val2014_000000000007.jpg or "
                                        r"000000000007.jpg or 7.jpg or 7.png in .*\); set data.on_error=skip"):
        _read(tmp_path, **kw)
    records, report = _read(tmp_path, "skip", **kw)
    assert len(records) == 2 and report.counts == {"image not found": 1}


def test_gqa_questions(tmp_path):
    _image(tmp_path / "gqa" / "2354786.jpg")
    _image(tmp_path / "gqa" / "n161313.jpg")
    path = _json(tmp_path / "val_balanced_questions.json", {
        "02930152": {"imageId": "2354786", "question": "Is the sky dark?", "answer": "yes", "fullAnswer": "Yes, it is.",
                     "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
        "07333408": {"imageId": "n161313", "question": "What is on the table?", "answer": "cup",
                     "types": {"structural": "query", "semantic": "rel"}},
        "07333409": {"imageId": "gone", "question": "Where?", "answer": "here", "types": {}},
    })
    kw = dict(path=str(path), format="auto", images=str(tmp_path / "gqa"), task="vqa")
    records, report = _read(tmp_path, "skip", **kw)
    assert [(r.question, r.answer, r.answers, r.type) for r in records] == [
        ("Is the sky dark?", "yes", ("yes",), "verifyAttr"), ("What is on the table?", "cup", ("cup",), "rel")]
    assert report.counts == {"image not found": 1} and "07333409" in report.examples["image not found"][0]


# --- webdataset ------------------------------------------------------------------------------------


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _shards(root: Path) -> Path:
    _tar(root / "shards" / "part-000000.tar", [
        ("000.png", _png_bytes((255, 0, 0))), ("000.txt", b"a red square"),
        ("001.jpg", _png_bytes((0, 255, 0))), ("001.json", json.dumps({"captions": ["green", "a green one"]}).encode()),
    ])
    _tar(root / "shards" / "part-000001.tar", [
        ("sub/002.webp", _png_bytes()), ("sub/002.json", json.dumps(
            {"question": "what color?", "answer": "blue", "answers": ["blue", "navy"], "type": "color"}).encode()),
        ("003.png", _png_bytes()), ("003.cls", b"3"), ("003.txt", b"blue again"),
    ])
    return root / "shards"


def test_webdataset_reads_samples_by_key(tmp_path):
    shards = _shards(tmp_path)
    captions, report = _read(tmp_path, path=str(shards), format="webdataset")
    assert report.total == 0
    assert [r.captions for r in captions] == [("a red square",), ("green", "a green one"), ("blue again",)]
    assert [r.index for r in captions] == [0, 1, 3]
    with Image.open(captions[0].image) as img:
        assert img.getpixel((0, 0)) == (255, 0, 0)
    assert Path(captions[0].image).is_relative_to(tmp_path / "work" / "webdataset")
    questions, _ = _read(tmp_path, path=str(shards / "part-{000000..000001}.tar"), format="auto", task="vqa")
    assert [(q.question, q.answer, q.answers, q.type) for q in questions] == [("what color?", "blue", ("blue", "navy"), "color")]
    assert questions[0].image.endswith("sub/002.webp")


def test_webdataset_is_extracted_once(tmp_path):
    shards = _shards(tmp_path)
    first, _ = _read(tmp_path, path=str(shards))
    folders = sorted((tmp_path / "work" / "webdataset").iterdir())
    assert len(folders) == 2  # one per shard, no temporary folder left behind
    stamps = {r.image: os.stat(r.image).st_mtime_ns for r in first}
    second, _ = _read(tmp_path, path=str(shards / "part-*.tar"))
    assert second == first
    assert {r.image: os.stat(r.image).st_mtime_ns for r in second} == stamps
    assert sorted((tmp_path / "work" / "webdataset").iterdir()) == folders
    # a changed shard (size / modification time) is a new key, unpacked afresh
    _tar(shards / "part-000000.tar", [("000.png", _png_bytes()), ("000.txt", b"changed")])
    third, _ = _read(tmp_path, path=str(shards))
    assert third[0].captions == ("changed",) and len(list((tmp_path / "work" / "webdataset").iterdir())) == 3


def test_webdataset_truncated_member_stops_or_is_counted(tmp_path):
    shard = _tar(tmp_path / "s.tar", [("a.png", _png_bytes()), ("a.txt", b"first"),
                                      ("b.png", Image.effect_noise((64, 64), 50).tobytes()), ("b.txt", b"second")])
    data = shard.read_bytes()
    shard.write_bytes(data[: 512 * 6 + 1000])  # a, a.txt, then b.png's header and part of its data
    with pytest.raises(DataError, match=r"s.tar:b.png: unreadable tar member \(unexpected end of data\); " + FIX):
        _read(tmp_path, path=str(shard))
    records, report = _read(tmp_path, "skip", path=str(shard))
    assert [r.captions for r in records] == [("first",)]
    assert report.counts == {"unreadable tar member": 1}  # b.txt was cut off with it: one bad member, not two


def test_webdataset_corrupt_header_and_bad_samples(tmp_path):
    shard = _tar(tmp_path / "s.tar", [("a.png", _png_bytes()), ("a.txt", b"ok"), ("b.txt", b"no image"),
                                      ("c.png", _png_bytes()), ("c.json", b"{not json"), ("d.png", _png_bytes())])
    data = bytearray(shard.read_bytes())
    end = len(data.rstrip(b"\0"))
    data[end: end + 512] = b"garbage!" * 64  # a header that is not one, after the last member
    shard.write_bytes(bytes(data))
    records, report = _read(tmp_path, "skip", path=str(shard))
    assert [r.captions for r in records] == [("ok",)]
    assert report.counts == {"unreadable tar member": 1, "sample has no image": 1, "invalid JSON": 1,
                             "sample has neither captions nor a question": 1}
    assert report.examples["sample has no image"] == [f"{shard}:b"]
    assert report.examples["unreadable tar member"][0].startswith(f"{shard}@")
    with pytest.raises(DataError, match=r"s.tar:c.json: invalid JSON \(.*\); " + FIX):
        _read(tmp_path, path=str(shard))
    not_tar = tmp_path / "bad" / "x.tar"
    not_tar.parent.mkdir()
    not_tar.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(DataError, match=r"x.tar: unreadable tar shard"):
        _read(tmp_path, path=str(not_tar))
    with pytest.raises(DataError, match="no tar shards at"):
        _read(tmp_path, path=str(tmp_path / "work"), format="webdataset")
    os.rename(shard, tmp_path / "part-000001.tar")
    with pytest.raises(DataError, match=r"webdataset shard '.*part-000002.tar' of .* does not exist"):
        _read(tmp_path, path=str(tmp_path / "part-{000001..000002}.tar"), format="webdataset")


def test_max_records_truncates_after_reading(tmp_path):
    shards = _shards(tmp_path)
    records, _ = _read(tmp_path, path=str(shards), max_records=2)
    assert [r.captions[0] for r in records] == ["a red square", "green"]
    ann = _coco(tmp_path / "coco", missing_image=True)
    records, report = _read(tmp_path, "skip", path=str(ann), images=str(tmp_path / "coco" / "images"), max_records=2)
    assert [r.index for r in records] == [0, 2] and report.total == 1  # the skipped record does not count


# --- Hugging Face datasets ----------------------------------------------------------------------------


def _hf_disk(path: Path, rows: dict, *, dict_split: str | None = None) -> Path:
    import datasets

    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    (datasets.DatasetDict({dict_split: ds}) if dict_split else ds).save_to_disk(str(path))
    return path


def _caption_rows() -> dict:
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    return {"image": [red, blue, red], "caption": [["a red square", "red"], ["a blue square"], ["red once more"]]}


def test_hf_disk_captions_materialized_once(tmp_path):
    path = _hf_disk(tmp_path / "ds", _caption_rows())
    assert detect_format(path) == "hf_disk"
    records, report = _read(tmp_path, path=str(path))
    assert report.total == 0
    assert [r.captions for r in records] == [("a red square", "red"), ("a blue square",), ("red once more",)]
    assert records[0].image == records[2].image != records[1].image  # the same image is one file
    with Image.open(records[1].image) as img:
        assert img.format == "PNG" and img.getpixel((0, 0)) == (0, 0, 255)
    folder = Path(records[0].image).parents[1]
    assert folder.parent == tmp_path / "work" / "hf"
    stamp = os.stat(records[0].image).st_mtime_ns
    again, _ = _read(tmp_path, path=str(path))
    assert again == records and os.stat(records[0].image).st_mtime_ns == stamp
    assert list(folder.parent.iterdir()) == [folder]
    one, _ = _read(tmp_path, path=str(path), max_records=1)
    assert [r.captions for r in one] == [("a red square", "red")]


def test_hf_disk_vqa_rows_and_splits(tmp_path):
    img = Image.new("RGB", (8, 8), (0, 200, 0))
    rows = {"image": [img, img], "question": ["what color?", "how many?"],
            "multiple_choice_answer": ["green", ""],
            "answers": [[{"answer": "green"}, {"answer": "lime"}, {"answer": "green"}], [{"answer": "1"}, {"answer": "one"}, {"answer": "one"}]],
            "answer_type": ["other", "number"]}
    path = _hf_disk(tmp_path / "dd", rows, dict_split="validation")
    records, _ = _read(tmp_path, path=str(path), format="hf_disk", task="vqa", split="validation")
    assert [(r.question, r.answer, r.answers, r.type) for r in records] == [
        ("what color?", "green", ("green", "lime"), "other"), ("how many?", "one", ("one", "1"), "number")]
    with pytest.raises(DataError, match=r"has no split 'train'; set split to one of \['validation'\]"):
        _read(tmp_path, path=str(path), task="vqa")
    with pytest.raises(DataError, match=r"no usable caption records in .*found 2 question records \(use task=vqa\)"):
        _read(tmp_path, path=str(path), task="caption", split="validation")


def test_hf_bad_image_row_stops_or_is_counted(tmp_path):
    import datasets

    good = {"bytes": _png_bytes(), "path": None}
    bad = {"bytes": b"not an image at all", "path": None}
    ds = datasets.Dataset.from_dict({"image": [good, bad], "text": ["fine", "broken"]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"ds\[train\]:1: unreadable image \(.*\); " + FIX):
        _read(tmp_path, path=str(tmp_path / "ds"))
    records, report = _read(tmp_path, "skip", path=str(tmp_path / "ds"))
    assert [r.captions for r in records] == [("fine",)] and report.counts == {"unreadable image": 1}


def test_hf_local_files_with_image_paths_and_streaming(tmp_path):
    import datasets

    _image(tmp_path / "data" / "img" / "a.png")
    _image(tmp_path / "data" / "img" / "b.png", (0, 0, 0))
    datasets.Dataset.from_dict({"file_name": ["img/a.png", "img/b.png", "img/gone.png"],
                                "sentences": [[{"raw": "one"}, {"raw": "two"}], [{"raw": "three"}], [{"raw": "four"}]]}
                               ).to_parquet(str(tmp_path / "data" / "rows.parquet"))
    path = str(tmp_path / "data" / "rows.parquet")
    assert detect_format(path) == "hf"
    records, report = _read(tmp_path, "skip", path=path)
    assert [r.captions for r in records] == [("one", "two"), ("three",)]
    assert records[0].image == str((tmp_path / "data" / "img" / "a.png").resolve())  # used in place
    assert report.counts == {"image not found": 1}
    with pytest.raises(DataError, match="streaming source .* needs max_records > 0"):
        _read(tmp_path, path=path, streaming=True)
    streamed, report = _read(tmp_path, path=path, streaming=True, max_records=2)
    assert [r.captions for r in streamed] == [("one", "two"), ("three",)] and report.total == 0


def test_hf_missing_columns(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"picture_id": [1], "label": [0]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"cannot find the columns to read \(columns: \['picture_id', 'label'\]\)"):
        _read(tmp_path, path=str(tmp_path / "ds"))


def test_hub_name_offline_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # The machine is offline anyway; offline mode makes the failure immediate instead of retried.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert detect_format("someone/captions-dataset") == "hf"
    with pytest.raises(DataError) as err:
        _read(tmp_path, path="someone/captions-dataset")
    message = str(err.value)
    assert "cannot load Hugging Face dataset 'someone/captions-dataset' (split 'train')" in message
    assert "save_to_disk(DIR) and set path: DIR, format: hf_disk" in message


# --- auto-detection ------------------------------------------------------------------------------------


def test_detect_format(tmp_path):
    split = tmp_path / "split"
    _image(split / "images" / "a.png")
    (split / "metadata.jsonl").write_text(json.dumps({"file_name": "images/a.png", "captions": ["x"]}) + "\n")
    assert detect_format(split) == "imagefolder"
    records, _ = _read(tmp_path, path=str(split))
    assert records == read_split(split, "caption")[0]
    assert detect_format(_coco(tmp_path / "coco")) == "coco"
    assert detect_format(_vqav2(tmp_path / "vqa")) == "vqa"
    shards = _shards(tmp_path)
    assert detect_format(shards) == detect_format(shards / "part-000000.tar") == "webdataset"
    assert detect_format(str(shards / "part-{000000..000001}.tar")) == "webdataset"
    assert detect_format(str(shards / "*.tar")) == "webdataset"
    assert detect_format("owner/name") == "hf"
    with pytest.raises(DataError, match="data source './missing' does not exist"):
        detect_format("./missing")
    other = _json(tmp_path / "other.json", {"foo": 1})
    with pytest.raises(DataError, match="cannot tell the format of .*other.json.*or set the source's format explicitly"):
        detect_format(other)
    annotations = tmp_path / "vqa" / "v2_mscoco_val2014_annotations.json"
    with pytest.raises(DataError, match="this is a VQAv2 annotations file: point path at the questions file"):
        detect_format(annotations)


# --- converters ------------------------------------------------------------------------------------------


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import coco_to_imagefolder
    import imagefolder_to_webdataset
    import vqa_to_imagefolder

    return coco_to_imagefolder, vqa_to_imagefolder, imagefolder_to_webdataset


def test_converters_help(scripts, capsys):
    for module in scripts:
        with pytest.raises(SystemExit) as exit_:
            module.main(["--help"])
        assert exit_.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_converters_round_trip(tmp_path, scripts):
    coco, vqa, to_wds = scripts
    ann = _coco(tmp_path / "c")
    assert coco.main(["--annotations", str(ann), "--images", str(tmp_path / "c" / "images"), "--out", str(tmp_path / "split")]) == 0
    assert vqa.main(["--questions", str(_vqav2(tmp_path / "v")), "--images", str(tmp_path / "v" / "coco"),
                     "--out", str(tmp_path / "split"), "--copy"]) == 0
    captions, _ = read_split(tmp_path / "split", "caption")
    questions, _ = read_split(tmp_path / "split", "vqa")
    direct, _ = _read(tmp_path, path=str(ann), images=str(tmp_path / "c" / "images"))
    assert [r.captions for r in captions] == [r.captions for r in direct]
    assert Path(captions[0].image).is_symlink() and not Path(questions[0].image).is_symlink()
    assert [(q.answer, q.answers, q.type) for q in questions][0] == ("red", ("red", "dark red", "maroon"), "other")
    assert to_wds.main(["--split", str(tmp_path / "split"), "--out", str(tmp_path / "wds"), "--shards", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "wds").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    wds_captions, _ = _read(tmp_path, path=str(tmp_path / "wds" / "shard-{000000..000001}.tar"))
    wds_questions, _ = _read(tmp_path, path=str(tmp_path / "wds"), task="vqa")
    assert [r.captions for r in wds_captions] == [r.captions for r in captions]
    assert [(q.question, q.answer, q.answers, q.type) for q in wds_questions] == [
        (q.question, q.answer, q.answers, q.type) for q in questions]
    assert coco.main(["--annotations", str(ann), "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 1


def test_read_source_rejects_a_bad_task_and_empty_path(tmp_path):
    with pytest.raises(DataError, match="empty path"):
        _read(tmp_path, path="")
    with pytest.raises(ValueError, match="on_error"):
        read_source(SourceConfig(path="x"), on_error="ignore", work_dir=tmp_path)
    with pytest.raises(ValueError, match="task must be 'caption' or 'vqa'"):
        read_source(SourceConfig(path="x", task="both"), work_dir=tmp_path)


# --- bad bytes and escaping paths ---------------------------------------------------------------------


def _escape_message(where: str, name: str, folder: str, root) -> str:
    return (f"{where}: image path escapes the {folder} ('{name}' is outside '{root}'); give a path inside the "
            f"{folder}, or set data.on_error=skip to skip such records")


@pytest.mark.parametrize("fmt", ["coco", "auto"])
@pytest.mark.parametrize("on_error", ["stop", "skip"])
def test_json_file_that_is_not_utf8_names_the_file(tmp_path, fmt, on_error):
    ann = _coco(tmp_path)
    text = ann.read_text().replace("Two things.", "Deux choses\u00e9.").replace(", ", ",\n")
    ann.write_bytes(text.encode("latin-1"))
    line = text[: text.index("\u00e9")].count("\n") + 1
    with pytest.raises(DataError) as err:
        _read(tmp_path, on_error, path=str(ann), format=fmt, images=str(tmp_path / "images"))
    assert str(err.value) == f"'{ann.resolve() if fmt == 'coco' else ann}' is not UTF-8 (invalid byte 0xe9 on line {line}); re-save the file as UTF-8"


def test_vqav2_annotations_that_are_not_utf8_name_the_file(tmp_path):
    questions = _vqav2(tmp_path)
    annotations = tmp_path / "v2_mscoco_val2014_annotations.json"
    annotations.write_bytes(annotations.read_bytes().replace(b'"maroon"', b'"marr\xf3n"'))
    with pytest.raises(DataError, match=r"'.*v2_mscoco_val2014_annotations.json' is not UTF-8 \(invalid byte 0xf3 on line 1\); "
                                        r"re-save the file as UTF-8$"):
        _read(tmp_path, "skip", path=str(questions), images=str(tmp_path / "coco"), task="vqa")


def test_coco_image_path_that_escapes_the_images_folder(tmp_path):
    ann = _coco(tmp_path / "c")
    _image(tmp_path / "secret.jpg")
    data = json.loads(ann.read_text())
    data["images"][1]["file_name"] = "../../secret.jpg"
    _json(ann, data)
    kw = dict(path=str(ann), format="coco", images=str(tmp_path / "c" / "images"))
    with pytest.raises(DataError) as err:
        _read(tmp_path, **kw)
    images = (tmp_path / "c" / "images").resolve()
    assert str(err.value) == _escape_message(f"{ann.resolve()}:images[1]", "../../secret.jpg", "images folder", images)
    records, report = _read(tmp_path, "skip", **kw)
    assert [r.index for r in records] == [0, 2] and report.counts == {"image path escapes the images folder": 1}


def test_gqa_image_id_that_escapes_the_images_folder(tmp_path):
    _image(tmp_path / "gqa" / "1.jpg")
    _image(tmp_path / "secret.jpg")
    path = _json(tmp_path / "questions.json", {
        "q1": {"imageId": "1", "question": "Is it red?", "answer": "yes"},
        "q2": {"imageId": "../secret", "question": "What is it?", "answer": "a secret"},
    })
    kw = dict(path=str(path), format="vqa", images=str(tmp_path / "gqa"), task="vqa")
    with pytest.raises(DataError) as err:
        _read(tmp_path, **kw)
    images = (tmp_path / "gqa").resolve()
    assert str(err.value) == _escape_message(f"{path.resolve()}:q2", "../secret.jpg", "images folder", images)
    records, report = _read(tmp_path, "skip", **kw)
    assert [r.question for r in records] == ["Is it red?"] and report.counts == {"image path escapes the images folder": 1}


@pytest.mark.parametrize("member", ["b.txt", "b.json"])
def test_webdataset_member_that_is_not_utf8_stops_or_is_counted(tmp_path, member):
    text = b"caf\xe9" if member == "b.txt" else b'{"caption": "caf\xe9"}'
    shard = _tar(tmp_path / "s.tar", [("a.png", _png_bytes()), ("a.txt", b"first"), ("b.png", _png_bytes()), (member, text),
                                      ("c.png", _png_bytes()), ("c.txt", "d\u00e9j\u00e0 vu".encode())])
    with pytest.raises(DataError) as err:
        _read(tmp_path, path=str(shard))
    position = text.index(b"\xe9") + 1
    assert str(err.value) == (f"{shard}:{member}: tar member is not UTF-8 (invalid byte 0xe9 at position {position}); "
                              "re-write the member as UTF-8, or set data.on_error=skip to skip such samples")
    records, report = _read(tmp_path, "skip", path=str(shard))
    assert [r.captions for r in records] == [("first",), ("d\u00e9j\u00e0 vu",)]
    assert report.counts == {"tar member is not UTF-8": 1} and report.examples["tar member is not UTF-8"] == [f"{shard}:{member}"]


@pytest.mark.parametrize("name", ["../evil.png", "/tmp/evil.png", "ok/../../evil.png"])
def test_webdataset_member_that_escapes_is_not_written(tmp_path, name):
    shard = _tar(tmp_path / "shards" / "s.tar", [("a.png", _png_bytes()), ("a.txt", b"first"),
                                                 (name, _png_bytes()), (name[:-4] + ".txt", b"evil")])
    with pytest.raises(DataError) as err:
        _read(tmp_path, path=str(shard))
    assert str(err.value) == _escape_message(f"{shard}:{name}", name, "shard", shard)
    records, report = _read(tmp_path, "skip", path=str(shard))
    assert [r.captions for r in records] == [("first",)] and report.counts == {"image path escapes the shard": 1}
    assert not list(tmp_path.rglob("evil.png"))  # nothing was written for it, inside the work folder or out


def test_webdataset_manifest_entry_that_escapes(tmp_path):
    shard = _tar(tmp_path / "s.tar", [("a.png", _png_bytes()), ("a.txt", b"first"), ("b.png", _png_bytes()), ("b.txt", b"second")])
    _read(tmp_path, path=str(shard))
    [manifest] = (tmp_path / "work" / "webdataset").glob("*/samples.jsonl")
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    entries[1]["image"] = "../../s.tar"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    records, report = _read(tmp_path, "skip", path=str(shard))
    assert [r.captions for r in records] == [("first",)] and report.counts == {"image path escapes the unpacked folder": 1}


def test_hf_image_path_that_escapes_the_dataset_folder(tmp_path):
    import datasets

    _image(tmp_path / "data" / "img" / "a.png")
    _image(tmp_path / "secret.png")
    datasets.Dataset.from_dict({"file_name": ["img/a.png", "../secret.png"], "text": ["inside", "outside"]}
                               ).to_parquet(str(tmp_path / "data" / "rows.parquet"))
    path = str(tmp_path / "data" / "rows.parquet")
    with pytest.raises(DataError) as err:
        _read(tmp_path, path=path)
    assert str(err.value) == _escape_message(f"{path}[train]:1", "../secret.png", "dataset folder", (tmp_path / "data").resolve())
    records, report = _read(tmp_path, "skip", path=path)
    assert [r.captions for r in records] == [("inside",)] and report.counts == {"image path escapes the dataset folder": 1}
