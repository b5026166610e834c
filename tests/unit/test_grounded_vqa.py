"""scripts/make_grounded_vqa.py: every answer agrees with the stored objects, questions are clear and
balanced, the splits read back as VQA, and the data set is its own (not the built-in world's)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vljepa.data.formats import VQARecord
from vljepa.data.readers import read_split
from vljepa.data.world import COLORS as WORLD_COLORS
from vljepa.data.world import SHAPES as WORLD_SHAPES

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def make():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(SCRIPTS))
        import make_grounded_vqa

    return make_grounded_vqa


@pytest.fixture(scope="module")
def dataset(make, tmp_path_factory):
    root = tmp_path_factory.mktemp("grounded_vqa")
    assert make.main(["--out", str(root), "--train", "150", "--test", "30", "--seed", "3"]) == 0
    return root


def _records(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / split / "metadata.jsonl").read_text().splitlines()]


def _oracle(make, question: str, objects: list[dict]) -> str:
    """The answer worked out from the objects alone; fails where a question is unclear."""
    colors, shapes = "|".join(make.PALETTE), "|".join(make.SHAPES)

    def by_color(color: str, shape: str | None = None) -> dict:
        found = [o for o in objects if o["color"] == color and shape in (None, o["shape"])]
        assert len(found) == 1, question
        return found[0]

    name = rf"({colors}) (?:({shapes})|one)"
    if m := re.fullmatch(rf"where is the {name}, left side or right side\?", question):
        o = by_color(m[1], m[2])
        assert abs(o["x"] - 0.5) >= 0.12
        return "left" if o["x"] < 0.5 else "right"
    if m := re.fullmatch(rf"is the {name} closer to the top edge or the bottom edge\?", question):
        o = by_color(m[1], m[2])
        assert abs(o["y"] - 0.5) >= 0.12
        return "top" if o["y"] < 0.5 else "bottom"
    if m := re.fullmatch(rf"which shape is ({colors})\?", question):
        return by_color(m[1])["shape"]
    if m := re.fullmatch(rf"which colour is the ({shapes})\?", question):
        found = [o for o in objects if o["shape"] == m[1]]
        assert len(found) == 1, question
        return found[0]["color"]
    if m := re.fullmatch(rf"is the ({colors}) ({shapes}) (left of|right of|above|below) the ({colors}) ({shapes})\?",
                         question):
        a, b = by_color(m[1], m[2]), by_color(m[4], m[5])
        axis = "x" if m[3] in ("left of", "right of") else "y"
        assert a is not b and abs(a[axis] - b[axis]) >= 0.15
        return "yes" if (a[axis] < b[axis]) == (m[3] in ("left of", "above")) else "no"
    raise AssertionError(f"unknown question form: {question!r}")


def test_answers_agree_with_objects(make, dataset):
    types: Counter = Counter()
    for split in ("train", "test"):
        for r in _records(dataset, split):
            assert r["answer"] == _oracle(make, r["question"], r["objects"]), r
            assert r["answers"] == [r["answer"]]
            types[r["type"]] += 1
    assert set(types) == {"position", "attribute", "relation"}
    assert min(types.values()) > 100


def test_scenes(make, dataset):
    by_image = {r["file_name"]: r["objects"] for r in _records(dataset, "train")}
    assert len(by_image) == 150
    assert set(Counter(len(objs) for objs in by_image.values())) == {2, 3, 4, 5}
    palette = {c: np.array(rgb) for c, rgb in make.PALETTE.items()}
    for file_name, objs in list(by_image.items())[:40]:
        assert len({o["color"] for o in objs}) == len(objs)
        pixels = np.asarray(Image.open(dataset / "train" / file_name)).astype(int)
        assert pixels.shape == (96, 96, 3)
        for o in objs:
            if o["shape"] != "ring":  # a ring's centre is background
                colour = pixels[int(o["y"] * 96), int(o["x"] * 96)]
                assert min(palette, key=lambda c: np.abs(palette[c] - colour).sum()) == o["color"]


def test_balanced_and_clear_only(dataset):
    records = _records(dataset, "train") + _records(dataset, "test")
    relation = Counter(r["answer"] for r in records if r["type"] == "relation")
    assert 0.42 < relation["yes"] / sum(relation.values()) < 0.58, relation
    position = Counter(r["answer"] for r in records if r["type"] == "position")
    assert 0.4 < position["left"] / (position["left"] + position["right"]) < 0.6, position
    assert 0.4 < position["top"] / (position["top"] + position["bottom"]) < 0.6, position
    # The colour of a shape is asked only where one object has that shape; scenes with a repeated
    # shape exist, and there the question names only the unique one.
    repeated = [r for r in records if r["question"].startswith("which colour")
                and len({o["shape"] for o in r["objects"]}) < len(r["objects"])]
    assert repeated


def test_reads_as_vqa_split(dataset):
    for split in ("train", "test"):
        records, report = read_split(dataset / split, "vqa")
        assert report.total == 0
        assert len(records) == len(_records(dataset, split))
        assert all(isinstance(r, VQARecord) and Path(r.image).is_file() for r in records)
        assert {r.type for r in records} == {"position", "attribute", "relation"}


def test_not_the_worlds_vocabulary(make, dataset):
    assert not set(make.PALETTE) & set(WORLD_COLORS) and not set(make.SHAPES) & set(WORLD_SHAPES)
    words = {w for r in _records(dataset, "train") for w in re.findall(r"[a-z]+", r["question"])}
    assert not words & (set(WORLD_COLORS) | set(WORLD_SHAPES) | {"color", "object"})


def test_deterministic_by_seed(make, tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert make.main(["--out", str(tmp_path / name), "--train", "6", "--test", "2", "--seed", str(seed),
                          "--image-size", "48"]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 6 + 2 + 2  # images and one metadata.jsonl per split
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert Image.open(tmp_path / "a/train/images/00000.png").size == (48, 48)
    assert (tmp_path / "a/train/metadata.jsonl").read_bytes() != (tmp_path / "c/train/metadata.jsonl").read_bytes()


@pytest.mark.parametrize("args, message", [(["--train", "0"], "--train must be at least 1, got 0"),
                                           (["--image-size", "16"], "--image-size must be at least 32, got 16")])
def test_rejects_bad_arguments(make, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        make.main(["--out", str(tmp_path), *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_relations_per_training_image(make, dataset, tmp_path):
    """--relations sets the training split's relation questions per image; the test split keeps the
    default, and everything before the relations is the same as the default set's."""
    assert make.main(["--out", str(tmp_path), "--train", "150", "--test", "30", "--seed", "3", "--relations", "6"]) == 0
    many, default = _records(tmp_path, "train"), _records(dataset, "train")
    per_image = lambda rows: {r["file_name"]: sum(q["file_name"] == r["file_name"] and q["type"] == "relation"  # noqa: E731
                                                  for q in rows) for r in rows}
    assert max(per_image(many).values()) > 2 >= max(per_image(default).values())
    assert [r for r in many if r["type"] != "relation"] == [r for r in default if r["type"] != "relation"]
    assert _records(tmp_path, "test") == _records(dataset, "test")
