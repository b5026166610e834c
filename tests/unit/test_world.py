"""The built-in world: determinism, the compositional split, and captions and answers
that agree with the scene objects stored beside each image."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vljepa.data import world as world_module
from vljepa.data.formats import CaptionRecord, VQARecord
from vljepa.data.readers import read_split
from vljepa.data.world import COLORS, SHAPES, SIZE_WORDS, generate_world

SPLITS = ("train", "test", "comp")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    info = generate_world(root, seed=7, n_train=120, n_test=40, n_comp=40, image_size=48, captions_per_image=4)
    return info


def _scenes(info, split: str) -> list[dict]:
    return _lines(info.root / split / "metadata.jsonl")


def _objects_by_file(info, split: str) -> dict[str, list[dict]]:
    return {r["file_name"]: r["objects"] for r in _scenes(info, split)}


def test_layout_and_world_json(world):
    meta = json.loads((world.root / "world.json").read_text())
    assert meta["splits"] == {"train": 120, "test": 40, "comp": 40} == world.splits
    assert meta["seed"] == 7 and meta["image_size"] == 48
    assert len(meta["classes"]) == len(COLORS) * len(SHAPES) == len(set(meta["classes"]))
    for split in SPLITS:
        assert len(_scenes(world, split)) == world.splits[split]
        assert len(list((world.root / split / "images").glob("*.png"))) == world.splits[split]
    used = {q["answer"] for split in SPLITS for q in _lines(world.root / split / "questions.jsonl")}
    assert meta["answers"] == world.answers == sorted(used)


def test_images_match_objects(world):
    """Each image is RGB at the right size, and each object's centre pixel has its colour."""
    palette = {name: np.array(rgb) for name, rgb in world_module._RGB.items()}
    for record in _scenes(world, "train")[:30]:
        img = Image.open(world.root / "train" / record["file_name"])
        assert img.mode == "RGB" and img.size == (48, 48)
        pixels = np.asarray(img).astype(int)
        for obj in record["objects"]:
            x, y = min(int(obj["x"] * 48), 47), min(int(obj["y"] * 48), 47)
            nearest = min(palette, key=lambda c: np.abs(palette[c] - pixels[y, x]).sum())
            assert nearest == obj["color"], (record["file_name"], obj)


def test_same_seed_same_world_other_seed_differs(tmp_path):
    kwargs = dict(n_train=6, n_test=3, n_comp=3, image_size=32, captions_per_image=2)
    a, b, c = (generate_world(tmp_path / n, seed=s, **kwargs) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    files = ["world.json"] + [f"{s}/{f}" for s in SPLITS for f in ("metadata.jsonl", "questions.jsonl")]
    for f in files:
        assert (a.root / f).read_bytes() == (b.root / f).read_bytes(), f
    pngs = sorted(p.relative_to(a.root) for p in a.root.glob("*/images/*.png"))
    assert len(pngs) == 12
    for p in pngs:
        assert np.array_equal(np.asarray(Image.open(a.root / p)), np.asarray(Image.open(b.root / p))), p
    assert (a.root / "train/metadata.jsonl").read_bytes() != (c.root / "train/metadata.jsonl").read_bytes()
    assert (a.root / "train/images/000000.png").read_bytes() != (c.root / "train/images/000000.png").read_bytes()


def test_splits_use_different_streams(world):
    train = (world.root / "train/images/000000.png").read_bytes()
    assert train != (world.root / "test/images/000000.png").read_bytes()
    assert _scenes(world, "train")[0]["objects"] != _scenes(world, "test")[0]["objects"]


def test_held_out_pairs(world):
    held = [tuple(p) for p in world.held_out]
    assert len(held) == 4
    assert len({c for c, _ in held}) == 4 and len({s for _, s in held}) == 4
    for split in ("train", "test"):
        for record in _scenes(world, split):
            assert not {(o["color"], o["shape"]) for o in record["objects"]} & set(held)
        # No question names a held-out pair, not even to answer "no".
        for q in _lines(world.root / split / "questions.jsonl"):
            for c, s in held:
                assert f"{c} {s}" not in q["question"] and f"the {s} {c}?" not in q["question"]
    for record in _scenes(world, "comp"):
        assert {(o["color"], o["shape"]) for o in record["objects"]} & set(held)


def test_scene_layout(world):
    for split in SPLITS:
        for record in _scenes(world, split):
            objs = record["objects"]
            assert 1 <= len(objs) <= 3
            assert len({(o["color"], o["shape"]) for o in objs}) == len(objs)
            thirds = [int(o["x"] * 3) for o in objs]
            assert thirds == sorted(set(thirds)), "objects must sit in distinct thirds, left to right"
            assert all(0 < o["y"] < 1 for o in objs)
            assert ("label" in record) == (len(objs) == 1)
            if len(objs) == 1:
                assert record["label"] == f"{objs[0]['color']} {objs[0]['shape']}"
    counts = Counter(len(r["objects"]) for r in _scenes(world, "train"))
    assert set(counts) == {1, 2, 3}


def _phrase_position(caption: str, obj: dict) -> int:
    """Where the caption names ``obj`` with its size, colour and shape; -1 if it does not."""
    for word in SIZE_WORDS[obj["size"]]:
        m = re.search(rf"\b{word} {obj['color']} {obj['shape']}\b", caption)
        if m:
            return m.start()
    return -1


def test_captions_name_every_object_in_order(world):
    for split in SPLITS:
        for record in _scenes(world, split):
            captions = record["captions"]
            assert len(captions) == 4 and len(set(captions)) == 4
            for caption in captions:
                assert caption == caption.lower()
                positions = [_phrase_position(caption, o) for o in record["objects"]]
                assert -1 not in positions, (caption, record["objects"])
                if caption.startswith("from left to right"):
                    assert positions == sorted(positions)
                if caption.startswith("from right to left"):
                    assert positions == sorted(positions, reverse=True)
                if len(positions) == 2 and " to the left of " in caption:
                    assert positions[0] < positions[1]


def _clear_vertical(objs: list[dict]) -> tuple[str, str] | None:
    """(upper, lower) names of the pair furthest apart vertically when clearly apart, worked out
    from the stored objects; None when no pair is, or when the gap sits at the threshold."""
    pairs = [(a, b) for i, a in enumerate(objs) for b in objs[i + 1 :]]
    if not pairs:
        return None
    a, b = max(pairs, key=lambda p: abs(p[0]["y"] - p[1]["y"]))
    gap = abs(a["y"] - b["y"])
    if abs(gap - world_module._VERTICAL_MIN) < 1e-3:
        return ("?", "?")  # rounding of the stored y decides; not checked
    if gap < world_module._VERTICAL_MIN:
        return None
    upper, lower = (a, b) if a["y"] < b["y"] else (b, a)
    return f"{upper['color']} {upper['shape']}", f"{lower['color']} {lower['shape']}"


def test_captions_state_the_clear_vertical_relation(world):
    """Two of the four paraphrases say which object is above which, exactly when two objects are
    clearly one above the other; what they say matches the stored positions."""
    stated = 0
    for split in SPLITS:
        for record in _scenes(world, split):
            pair = _clear_vertical(record["objects"])
            if pair == ("?", "?"):
                continue
            vertical = [c for c in record["captions"] if " above " in c or " below " in c]
            if pair is None:
                assert vertical == [], (record["captions"], record["objects"])
                continue
            upper, lower = pair
            assert sorted(vertical) == sorted(
                [record["captions"][1], record["captions"][3]]
            ), record["captions"]
            assert record["captions"][1].endswith(f", and the {upper} is above the {lower}")
            assert record["captions"][3].endswith(f", and the {lower} is below the {upper}")
            stated += 1
    assert stated > 0


_COUNTS = ("zero", "one", "two", "three")


def _oracle(question: str, objs: list[dict]) -> str:
    """The answer to a world question, worked out from the scene objects alone."""

    def find(color=None, shape=None, size=None) -> list[dict]:
        return [
            o
            for o in objs
            if color in (None, o["color"]) and shape in (None, o["shape"]) and size in (None, o["size"])
        ]

    def one(**kw) -> dict:
        found = find(**kw)
        assert len(found) == 1, f"ambiguous or absent referent in {question!r}"
        return found[0]

    colors, shapes, sizes = "|".join(COLORS), "|".join(SHAPES), "small|large"
    if m := re.fullmatch(rf"what color is the (?:({sizes}) )?({shapes})\?", question):
        return one(size=m[1], shape=m[2])["color"]
    if m := re.fullmatch(rf"what shape is the ({colors}) object\?", question):
        return one(color=m[1])["shape"]
    if m := re.fullmatch(rf"what size is the ({colors}) ({shapes})\?", question):
        return one(color=m[1], shape=m[2])["size"]
    if question == "how many objects are there?":
        return _COUNTS[len(objs)]
    if m := re.fullmatch(rf"how many ({shapes})s are there\?", question):
        return _COUNTS[len(find(shape=m[1]))]
    if m := re.fullmatch(rf"is there a ({colors}) ({shapes})\?", question):
        return "yes" if find(color=m[1], shape=m[2]) else "no"
    if m := re.fullmatch(rf"what is to the (left|right) of the ({colors}) ({shapes})\?", question):
        ref = one(color=m[2], shape=m[3])
        side = [o for o in objs if (o["x"] < ref["x"]) == (m[1] == "left") and o is not ref]
        assert len(side) == 1
        return f"{side[0]['color']} {side[0]['shape']}"
    pair = rf"is the ({colors}) ({shapes}) (to the left of|to the right of|above|below) the ({colors}) ({shapes})\?"
    if m := re.fullmatch(pair, question):
        a, b = one(color=m[1], shape=m[2]), one(color=m[4], shape=m[5])
        if m[3] in ("above", "below"):
            assert abs(a["y"] - b["y"]) >= 0.25 - 1e-3
        holds = {
            "to the left of": a["x"] < b["x"],
            "to the right of": a["x"] > b["x"],
            "above": a["y"] < b["y"],
            "below": a["y"] > b["y"],
        }[m[3]]
        return "yes" if holds else "no"
    if m := re.fullmatch(rf"is the ({shapes}) ({colors})\?", question):
        return "yes" if one(shape=m[1])["color"] == m[2] else "no"
    if m := re.fullmatch(rf"is the ({colors}) ({shapes}) ({sizes})\?", question):
        return "yes" if one(color=m[1], shape=m[2])["size"] == m[3] else "no"
    raise AssertionError(f"unknown question form: {question!r}")


def test_answers_agree_with_scene(world):
    types: Counter = Counter()
    for split in SPLITS:
        objects = _objects_by_file(world, split)
        for q in _lines(world.root / split / "questions.jsonl"):
            objs = objects[q["file_name"]]
            assert q["answer"] == _oracle(q["question"], objs), (q, objs)
            assert q["answer"] in q["answers"]
            if q["type"] == "relation":
                assert len(objs) >= 2
            types[q["type"]] += 1
    assert set(types) == {"color", "shape", "size", "count", "exist", "relation", "yesno"}


def test_one_question_per_type_per_image(world):
    """One question of each type, but up to three distinct relation questions per scene."""
    scenes = _scenes(world, "train")
    questions = _lines(world.root / "train/questions.jsonl")
    per_image = Counter((q["file_name"], q["type"]) for q in questions)
    assert max(n for (_, t), n in per_image.items() if t != "relation") == 1
    assert max(n for (_, t), n in per_image.items() if t == "relation") == world_module._RELATION_QUESTIONS
    relation_texts = Counter((q["file_name"], q["question"]) for q in questions if q["type"] == "relation")
    assert max(relation_texts.values()) == 1  # never the same relation question twice for one image
    for record in scenes:
        for qtype in ("size", "count", "exist", "yesno"):  # these can always be asked
            assert per_image[(record["file_name"], qtype)] == 1


def test_yes_no_balanced(world):
    questions = _lines(world.root / "train/questions.jsonl") + _lines(world.root / "test/questions.jsonl")
    answers = Counter(q["answer"] for q in questions if q["answer"] in ("yes", "no"))
    total = answers["yes"] + answers["no"]
    assert total > 300
    assert 0.4 < answers["yes"] / total < 0.6, answers
    # "no" to an existence question is a near miss: one attribute away from a scene object.
    objects = _objects_by_file(world, "train")
    for q in _lines(world.root / "train/questions.jsonl"):
        if q["type"] == "exist" and q["answer"] == "no":
            color, shape = re.fullmatch(r"is there a (\w+) (\w+)\?", q["question"]).groups()
            assert any(o["color"] == color or o["shape"] == shape for o in objects[q["file_name"]])


def test_reads_back_through_read_split(world):
    captions, report = read_split(world.root / "train", "caption")
    assert report.total == 0 and len(captions) == 120
    assert all(isinstance(r, CaptionRecord) and len(r.captions) == 4 for r in captions)
    assert Path(captions[5].image).is_file() and Path(captions[5].image).is_absolute()
    assert sum(r.label is not None for r in captions) == sum(len(r["objects"]) == 1 for r in _scenes(world, "train"))
    questions, report = read_split(world.root / "comp", "vqa")
    assert report.total == 0
    assert len(questions) == len(_lines(world.root / "comp/questions.jsonl"))
    assert all(isinstance(r, VQARecord) and r.type for r in questions)


def test_rejects_too_many_captions(tmp_path):
    with pytest.raises(ValueError, match="captions_per_image"):
        generate_world(tmp_path, n_train=1, n_test=1, n_comp=1, captions_per_image=world_module.MAX_CAPTIONS + 1)


def test_hf_imagefolder_reads_a_split(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets  # noqa: PLC0415 - heavy import, only this test needs it

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    ds = datasets.load_dataset("imagefolder", data_dir=str(world.root / "test"), cache_dir=str(tmp_path))["train"]
    assert ds.num_rows == 40
    assert {"image", "captions", "objects", "label"} <= set(ds.column_names)
    first = _scenes(world, "test")[0]
    assert ds[0]["captions"] == first["captions"]
    assert ds[0]["image"].size == (48, 48)


def test_same_content_gives_the_same_captions(world):
    """Captions are a function of the scene's content (objects, left to right, and the clear
    vertical relation), so an image's caption set contains every caption written for a twin image
    showing the same content."""
    by_content: dict[tuple, set[tuple[str, ...]]] = {}
    for split in SPLITS:
        for record in _scenes(world, split):
            vertical = _clear_vertical(record["objects"])
            if vertical == ("?", "?"):
                continue
            objects = tuple((o["size"], o["color"], o["shape"]) for o in sorted(record["objects"], key=lambda o: o["x"]))
            content = objects if vertical is None else objects + (vertical,)
            by_content.setdefault(content, set()).add(tuple(record["captions"]))
    assert all(len(sets) == 1 for sets in by_content.values())
    assert sum(1 for c in by_content if len(c) == 1) < sum(1 for r in _scenes(world, "train") if len(r["objects"]) == 1)
    one_object = next(c for c in by_content if len(c) == 1)
    captions = next(iter(by_content[one_object]))
    assert len(set(captions)) == 4  # distinct paraphrases
