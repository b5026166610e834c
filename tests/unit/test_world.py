"""The built-in world: determinism, the compositional split, and captions and answers
that agree with the scene objects stored beside each image; the default world byte for byte as
before; the grounded question families and scenes of up to six objects."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vljepa.cli import main as cli_main
from vljepa.data.formats import CaptionRecord, VQARecord
from vljepa.data.readers import read_split
from vljepa.data.world import COLORS, MAX_CAPTIONS, SHAPES, SIZE_WORDS, generate_world, grounded, scenes
from vljepa.data.world.questions import RELATION_QUESTIONS
from vljepa.data.world.scenes import SceneObject

SPLITS = ("train", "test", "comp")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    info = generate_world(root, seed=7, n_train=120, n_test=40, n_comp=40, image_size=48, captions_per_image=4)
    return info


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """A grounded world of 1-6 objects per image."""
    root = tmp_path_factory.mktemp("crowded")
    return generate_world(root, seed=3, n_train=240, n_test=30, n_comp=30, image_size=48, captions_per_image=4,
                          grounded=True, max_objects=6)


@pytest.fixture(params=["world", "crowded"])
def any_world(request):
    return request.getfixturevalue(request.param)


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


def test_images_match_objects(any_world):
    """Each image is RGB at the right size, and each object's centre pixel has its colour."""
    palette = {name: np.array(rgb) for name, rgb in scenes.RGB.items()}
    for record in _scenes(any_world, "train")[:30]:
        img = Image.open(any_world.root / "train" / record["file_name"])
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


def test_held_out_pairs(any_world):
    world = any_world
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


def test_captions_name_every_object_in_order(any_world):
    world = any_world
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
    if abs(gap - scenes.VERTICAL_MIN) < 1e-3:
        return ("?", "?")  # rounding of the stored y decides; not checked
    if gap < scenes.VERTICAL_MIN:
        return None
    upper, lower = (a, b) if a["y"] < b["y"] else (b, a)
    return f"{upper['color']} {upper['shape']}", f"{lower['color']} {lower['shape']}"


def test_captions_state_the_clear_vertical_relation(any_world):
    """Two of the four paraphrases say which object is above which, exactly when two objects are
    clearly one above the other; what they say matches the stored positions."""
    world = any_world
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


_COUNTS = ("zero", "one", "two", "three", "four", "five", "six")


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


def test_answers_agree_with_scene(any_world):
    world = any_world
    types: Counter = Counter()
    for split in SPLITS:
        objects = _objects_by_file(world, split)
        for q in _lines(world.root / split / "questions.jsonl"):
            if "family" in q:  # grounded: see test_grounded_answers_agree_with_scene
                continue
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
    assert max(n for (_, t), n in per_image.items() if t == "relation") == RELATION_QUESTIONS
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
        generate_world(tmp_path, n_train=1, n_test=1, n_comp=1, captions_per_image=MAX_CAPTIONS + 1)


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


# --- the default world, byte for byte ---------------------------------------------------------------

# sha256 of the files (JSON) and of the decoded pixels (images) written by the world before the
# grounded families existed; the quickstart's reference results depend on these worlds.
_DEFAULT_WORLD = {
    "world.json": "f72144d42a273ee99bf3b7def43242790348365933a688386760a5537c8cbf58",
    "train/metadata.jsonl": "131e45f53de6d1e05754f01948a2637d578de377b6384ead9d3bd8cd50630acf",
    "train/questions.jsonl": "530ab93dd10947512816d12f43fd5ba8ba48eaf7e99c43966b95c9e11cee2abf",
    "test/metadata.jsonl": "3fc52aa29478c386a749a363046975c85095eceb130abf4accb1f1bd4e2e8a4d",
    "test/questions.jsonl": "ddef20279204fd8d658fc853327a4c4701951c8b4d565d734f3cd8af19970e93",
    "comp/metadata.jsonl": "5975da34fdbb543813ed4622d07acd128eba16ee2c8f1ccd0e6fa293a799b4c1",
    "comp/questions.jsonl": "8b91f24573d69e9a5d366eaf40c6438e5373fb53f6c82a5097f76657751e0358",
    "train/images/000000.png": "044b75dd1481c7e9b16999272a0eb8741a2185c069520169582e2643abf6dd7b",
    "test/images/000005.png": "fb2bc09412fb4705158f68c21a45c06883732f4fa8c9bc39bbb0abe6488a8d80",
    "comp/images/000003.png": "bbea403c595241fd383a69761470ba55970ff1dc874042c221ecaefc0aaf364c",
}
_DEFAULT_CLI_WORLD = {  # vljepa world --train 5 --test 3 --comp 3 --seed 2
    "world.json": "bdd33097ee159ea5639f2c1e0a1e6503a63b632affb40281e7589cfc5c2ab440",
    "train/metadata.jsonl": "dc127d8e762fb08c9244ea71c86a4ce4a10f5d0fa83002174f260e240c1b4687",
    "train/questions.jsonl": "86d9a02adccee0c2d6d2dedf0e6934ab990fc85c8f5a93d02f31e18e09b5ef11",
    "comp/questions.jsonl": "125f43a9cbddb32b3db0a33df47af9b68824f78009e9eb76025c46e587a0c2a0",
    "train/images/000004.png": "46e70e4ea4624d0027d770810d6c50f4e5d9856f31e202607042c20b2fa735a8",
}


def _digests(root: Path, names) -> dict[str, str]:
    def data(name: str) -> bytes:
        path = root / name
        return np.asarray(Image.open(path)).tobytes() if name.endswith(".png") else path.read_bytes()

    return {name: hashlib.sha256(data(name)).hexdigest() for name in names}


def test_default_world_is_unchanged(tmp_path):
    info = generate_world(tmp_path, seed=0, n_train=12, n_test=6, n_comp=6)
    assert _digests(info.root, _DEFAULT_WORLD) == _DEFAULT_WORLD


def test_cli_default_world_is_unchanged(tmp_path):
    out = tmp_path / "w"
    assert cli_main(["world", "--out", str(out), "--train", "5", "--test", "3", "--comp", "3", "--seed", "2"]) == 0
    assert _digests(out, _DEFAULT_CLI_WORLD) == _DEFAULT_CLI_WORLD


def test_cli_rejects_max_objects_out_of_range(tmp_path, capsys):
    assert cli_main(["world", "--out", str(tmp_path / "w"), "--max-objects", "9"]) == 2
    assert "--max-objects must be in 1..6, got 9" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("max_objects", [0, 7])
def test_rejects_max_objects_out_of_range(tmp_path, max_objects):
    with pytest.raises(ValueError, match=f"max_objects must be in 1..6, got {max_objects}"):
        generate_world(tmp_path, n_train=1, n_test=1, n_comp=1, max_objects=max_objects)


def test_grounded_adds_questions_and_keeps_the_rest(tmp_path):
    """With three objects at most, ``grounded`` changes no image, caption or classic question: it
    only adds grounded records (each with a family) after each image's classic ones."""
    kwargs = dict(seed=4, n_train=20, n_test=5, n_comp=5, image_size=32, captions_per_image=2)
    plain, rich = generate_world(tmp_path / "p", **kwargs), generate_world(tmp_path / "g", grounded=True, **kwargs)
    for split in SPLITS:
        meta = split + "/metadata.jsonl"
        assert (plain.root / meta).read_bytes() == (rich.root / meta).read_bytes()
        for p in (plain.root / split / "images").glob("*.png"):
            assert p.read_bytes() == (rich.root / split / "images" / p.name).read_bytes()
        added = _lines(rich.root / split / "questions.jsonl")
        assert [q for q in added if "family" not in q] == _lines(plain.root / split / "questions.jsonl")
        assert sum("family" in q for q in added) > 2 * len(_scenes(rich, split))
        order = [q["file_name"] for q in added]
        assert order == sorted(order)  # an image's questions stay together
    world_json = json.loads((rich.root / "world.json").read_text())
    assert world_json["grounded"] is True and world_json["max_objects"] == 3
    assert "grounded" not in json.loads((plain.root / "world.json").read_text())


# --- scenes of up to six objects ------------------------------------------------------------------------


def test_crowded_layout(crowded):
    counts: Counter = Counter()
    for split in SPLITS:
        for record in _scenes(crowded, split):
            objs = record["objects"]
            counts[len(objs)] += 1
            assert len({(o["color"], o["shape"]) for o in objs}) == len(objs)
            xs = [o["x"] for o in objs]
            assert xs == sorted(xs) and all(b - a >= 0.1 - 1e-3 for a, b in zip(xs, xs[1:]))
            for i, a in enumerate(objs):
                assert 0 < a["x"] < 1 and 0 < a["y"] < 1
                for b in objs[i + 1 :]:  # the two smallest radii plus the gap
                    assert math.hypot(a["x"] - b["x"], a["y"] - b["y"]) >= 2 * 0.07 * 0.92 + 0.04 - 1e-3
    assert set(counts) == {1, 2, 3, 4, 5, 6}
    assert any(len(r["objects"]) > 3 and int(r["objects"][0]["x"] * 3) == int(r["objects"][1]["x"] * 3)
               for r in _scenes(crowded, "train")), "objects are not confined to one per third"


def test_fewer_objects_keep_the_thirds(tmp_path):
    info = generate_world(tmp_path, seed=2, n_train=40, n_test=1, n_comp=1, image_size=16, captions_per_image=1,
                          max_objects=2)
    records = _scenes(info, "train")
    assert {len(r["objects"]) for r in records} == {1, 2}
    for r in records:
        thirds = [int(o["x"] * 3) for o in r["objects"]]
        assert thirds == sorted(set(thirds))


def test_crowded_world_is_deterministic(tmp_path):
    kwargs = dict(n_train=8, n_test=2, n_comp=2, image_size=32, captions_per_image=2, grounded=True, max_objects=6)
    a, b, c = (generate_world(tmp_path / n, seed=s, **kwargs) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    for f in [f"{s}/{name}" for s in SPLITS for name in ("metadata.jsonl", "questions.jsonl")] + ["world.json"]:
        assert (a.root / f).read_bytes() == (b.root / f).read_bytes(), f
    for p in sorted(a.root.glob("*/images/*.png")):
        assert p.read_bytes() == (b.root / p.relative_to(a.root)).read_bytes()
    assert (a.root / "train/questions.jsonl").read_bytes() != (c.root / "train/questions.jsonl").read_bytes()


# --- grounded questions ---------------------------------------------------------------------------------

_TYPES = {"position_lr": "position", "position_tb": "position", "attribute_shape": "attribute",
          "attribute_color": "attribute", "attribute_size": "attribute", "nearest": "nearest",
          "furthest": "furthest", "share_color": "share_count", "share_shape": "share_count",
          "relation_left": "relation_yesno", "relation_right": "relation_yesno",
          "relation_above": "relation_yesno", "relation_below": "relation_yesno"}
_NAME = rf"(?:(small|large) )?(?:({'|'.join(COLORS)}) )?({'|'.join(SHAPES)}|object)"


def _referent(objs: list[dict], size: str | None, color: str | None, shape: str) -> dict:
    """The one object a name such as "small red object" or "square" fits; fails if none or several."""
    assert color or shape != "object", "a name must give a colour or a shape"
    found = [o for o in objs if size in (None, o["size"]) and color in (None, o["color"])
             and shape in ("object", o["shape"])]
    assert len(found) == 1, f"ambiguous or absent referent {(size, color, shape)}"
    return found[0]


def _dist(a: dict, b: dict) -> float:
    return math.hypot(a["x"] - b["x"], a["y"] - b["y"])


def _grounded_oracle(q: dict, objs: list[dict]) -> str:
    """A grounded question's answer, worked out from the scene objects alone; fails where the
    question is ambiguous or its answer not clear. Checks the family the question's form has."""
    text, family = q["question"], q["family"]

    def check(expected: str) -> None:
        assert family == expected, (text, family)

    if m := re.fullmatch(rf"is the {_NAME} on the left or the right of the image\?", text):
        check("position_lr")
        o = _referent(objs, *m.groups())
        assert abs(o["x"] - 0.5) >= grounded.SIDE_MARGIN
        return "left" if o["x"] < 0.5 else "right"
    if m := re.fullmatch(rf"is the {_NAME} at the top or the bottom of the image\?", text):
        check("position_tb")
        o = _referent(objs, *m.groups())
        assert abs(o["y"] - 0.5) >= grounded.SIDE_MARGIN
        return "top" if o["y"] < 0.5 else "bottom"
    if m := re.fullmatch(rf"what (shape|color|size) is the {_NAME}\?", text):
        check(f"attribute_{m[1]}")
        size, color, shape = m.groups()[1:]
        given = {"size": size, "color": color, "shape": None if shape == "object" else shape}
        assert given[m[1]] is None, "the name gives away the answer"
        return _referent(objs, size, color, shape)[m[1]]
    if m := re.fullmatch(rf"which object is (nearest to|furthest from) the {_NAME}\?", text):
        check("nearest" if m[1] == "nearest to" else "furthest")
        ref = _referent(objs, *m.groups()[1:])
        others = sorted((o for o in objs if o is not ref), key=lambda o: _dist(o, ref), reverse=m[1] != "nearest to")
        assert len(others) >= 2
        first, second = _dist(others[0], ref), _dist(others[1], ref)
        assert max(first, second) > grounded.DISTANCE_RATIO * min(first, second)
        return f"{others[0]['color']} {others[0]['shape']}"
    if m := re.fullmatch(rf"how many other objects have the same (color|shape) as the {_NAME}\?", text):
        check(f"share_{m[1]}")
        ref = _referent(objs, *m.groups()[1:])
        assert len(objs) >= 2
        return _COUNTS[sum(o[m[1]] == ref[m[1]] for o in objs if o is not ref)]
    if m := re.fullmatch(rf"is the {_NAME} (to the left of|to the right of|above|below) the {_NAME}\?", text):
        relation = m[4].removeprefix("to the ").removesuffix(" of")
        check(f"relation_{relation}")
        a, b = _referent(objs, *m.groups()[:3]), _referent(objs, *m.groups()[4:])
        axis = "x" if relation in ("left", "right") else "y"
        assert a is not b and abs(a[axis] - b[axis]) >= grounded.RELATION_MIN
        holds = (a[axis] < b[axis]) == (relation in ("left", "above"))
        return "yes" if holds else "no"
    raise AssertionError(f"unknown grounded question form: {text!r}")


@pytest.fixture(params=["crowded", "grounded_thirds"])
def grounded_world(request, tmp_path_factory):
    if request.param == "crowded":
        return request.getfixturevalue("crowded")
    root = tmp_path_factory.mktemp("grounded_thirds")
    return generate_world(root, seed=11, n_train=40, n_test=10, n_comp=10, image_size=16, captions_per_image=1,
                          grounded=True)


def test_grounded_answers_agree_with_scene(grounded_world):
    families: Counter = Counter()
    for split in SPLITS:
        objects = _objects_by_file(grounded_world, split)
        questions = _lines(grounded_world.root / split / "questions.jsonl")
        for q in questions:
            if "family" not in q:
                continue
            assert q["type"] == _TYPES[q["family"]]
            assert q["answer"] == _grounded_oracle(q, objects[q["file_name"]]), q
            assert q["answer"] in q["answers"]
            families[q["family"]] += 1
        texts = Counter((q["file_name"], q["question"]) for q in questions)
        assert max(texts.values()) == 1  # no image is asked the same question twice
    assert set(families) == set(_TYPES)
    assert set(_TYPES) == set(grounded.TEMPLATES) == set(grounded.TYPES)


def test_grounded_answers_are_balanced(crowded):
    questions = [q | {"file_name": f"{split}/{q['file_name']}"}
                 for split in ("train", "test") for q in _lines(crowded.root / split / "questions.jsonl")]

    def share(type_or_family: str, answer: str) -> float:
        answers = [q["answer"] for q in questions if type_or_family in (q["type"], q.get("family"))]
        assert len(answers) > 150, type_or_family
        return answers.count(answer) / len(answers)

    assert 0.45 < share("relation_yesno", "yes") < 0.55
    assert 0.4 < share("position_lr", "left") < 0.6
    assert 0.4 < share("position_tb", "top") < 0.6
    assert share("share_count", "zero") < 0.75  # counts are not nearly always zero
    per_image = Counter((q["file_name"], q["type"]) for q in questions if "family" in q)
    assert max(n for (_, t), n in per_image.items() if t == "relation_yesno") == RELATION_QUESTIONS
    assert max(n for (_, t), n in per_image.items() if t == "position") == 2  # left/right and top/bottom


def _asked(objects: list[SceneObject], draws: int = 200) -> list[tuple[str, str, str]]:
    """(family, question, answer) of every grounded question drawn for a scene over many streams."""
    return [(f, q, a) for s in range(draws)
            for _, f, q, a, _ in grounded.grounded_questions(scenes.rng_for(s), objects, set())]


def _obj(color: str, shape: str, x: float, y: float, size: str = "small") -> SceneObject:
    return SceneObject(color=color, shape=shape, size=size, x=x, y=y, r=0.05)


def test_grounded_names_are_unambiguous():
    """Two red objects: never "the red object"; two circles: never "the circle"."""
    scene = [_obj("red", "circle", 0.2, 0.2), _obj("red", "square", 0.5, 0.8, "large"),
             _obj("blue", "circle", 0.8, 0.3, "large")]
    texts = [q for _, q, _ in _asked(scene)]
    assert not any("the red object" in t or re.search(r"the circle\b", t) for t in texts)
    assert any("the small red object" in t for t in texts) and any("the small circle" in t for t in texts)
    assert any("the square" in t for t in texts) and any("the blue object" in t for t in texts)
    assert ("attribute_shape", "what shape is the small red object?", "circle") in _asked(scene)


def test_grounded_asks_only_clear_positions_distances_and_relations():
    near_middle = _obj("red", "circle", 0.56, 0.1)  # clearly at the top, not clearly left or right
    scene = [near_middle, _obj("blue", "star", 0.12, 0.9), _obj("green", "square", 0.7, 0.6)]
    asked = _asked(scene)
    lr = {q for f, q, _ in asked if f == "position_lr"}
    assert lr and not any("red" in q or "circle" in q for q in lr)
    assert ("position_tb", "is the red object at the top or the bottom of the image?", "top") in asked
    # Distances from the green square: red 0.52, blue 0.66 -> ratio 1.27, no nearest/furthest question.
    distance = [q for f, q, _ in asked if f in ("nearest", "furthest")]
    assert distance and not any(q.endswith(("the green square?", "the square?", "the green object?")) for q in distance)
    # The red circle and the green square are 0.14 apart along x: no left/right relation between them.
    for f, q, _ in asked:
        if f in ("relation_left", "relation_right"):
            assert not ({"red", "circle"} & set(q.split()) and {"green", "square"} & set(q.split())), q
    assert any(f == "relation_above" and "red" in q and "green" in q for f, q, _ in asked)


# --- video clips ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from vljepa.data.world import generate_video_world

    return generate_video_world(tmp_path_factory.mktemp("clips"), seed=5, n_train=20, n_test=4, image_size=64)


def test_video_world_is_deterministic_per_seed(tmp_path):
    from vljepa.data.world import generate_video_world

    one, again, other = (generate_video_world(tmp_path / name, seed=seed, n_train=4, n_test=2, image_size=32)
                         for name, seed in (("one", 5), ("again", 5), ("other", 6)))
    files = sorted(p.relative_to(one.root) for p in one.root.rglob("*") if p.is_file())
    assert len(files) == 1 + 2 * 2 + 6 == len(list(again.root.rglob("*.*")))  # world.json, records, videos
    for f in files:
        assert (one.root / f).read_bytes() == (again.root / f).read_bytes(), f
    assert (one.root / "train/metadata.jsonl").read_bytes() != (other.root / "train/metadata.jsonl").read_bytes()


def test_video_world_reads_back_through_the_readers(clips):
    from vljepa.data.readers import load_visual

    meta = json.loads((clips.root / "world.json").read_text())
    assert meta["video"] is True and meta["splits"] == {"train": 20, "test": 4}
    for split, n in meta["splits"].items():
        captions, skipped = read_split(clips.root / split, "caption")
        questions, _ = read_split(clips.root / split, "vqa")
        assert skipped.total == 0 and len(captions) == n == len({q.image for q in questions})
        assert all(r.clip is not None and (r.clip.start, r.clip.end) == (0.0, 2.0) for r in captions)
    frames = load_visual(captions[0].image, num_frames=4)
    assert len(frames) == 4 and all(f.size == (64, 64) for f in frames)


def _color_at(frame: Image.Image, obj: dict) -> str:
    """The palette colour nearest to the pixel at an object's centre."""
    x, y = min(int(obj["x"] * 64), 63), min(int(obj["y"] * 64), 63)
    pixel = np.asarray(frame)[y, x].astype(int)
    return min(scenes.RGB, key=lambda name: np.abs(pixel - np.array(scenes.RGB[name])).sum())


def test_video_world_frames_events_and_answers_agree(clips):
    """The first frame shows ``objects``, the last ``objects_end``; each event lies in the middle half
    of its clip; captions, counts and "what happened" answers match the event."""
    from vljepa.data.readers import read_clip

    root = clips.root / "train"
    questions: dict[str, list[dict]] = {}
    for q in _lines(root / "questions.jsonl"):
        questions.setdefault(q["video"], []).append(q)
    kinds = Counter()
    for record in _lines(root / "metadata.jsonl"):
        (event,) = record["events"]
        kinds[event["kind"]] += 1
        assert 0.5 <= event["start"] < event["end"] <= 1.5  # inside [D/4, 3D/4] of a 2 s clip
        frames, times = read_clip(root / record["video"])
        assert len(frames) == 16 and times[-1] == pytest.approx(15 / 8)
        for frame, objects in ((frames[0], record["objects"]), (frames[-1], record["objects_end"])):
            assert [_color_at(frame, o) for o in objects] == [o["color"] for o in objects], record["video"]
        assert event["text"] == record["captions"][0]
        asked = {q["type"] + ":" + q["question"]: q["answer"] for q in questions[record["video"]]}
        n_start, n_end = len(record["objects"]), len(record["objects_end"])
        assert asked["count_start:how many objects are there at the start?"] == scenes.COUNT_WORDS[n_start]
        assert asked["count_end:how many objects are there at the end?"] == scenes.COUNT_WORDS[n_end]
        assert n_end - n_start == {"appear": 1, "disappear": -1}.get(event["kind"], 0)
        happened = {v for k, v in asked.items() if k.startswith("event:") and v != "nothing"}
        assert len(happened) == 1 and happened.pop().split()[1].startswith(
            {"move": "moved", "appear": "appeared", "disappear": "disappeared", "recolor": "changed",
             "reshape": "changed"}[event["kind"]])
    assert set(kinds) == {"move", "appear", "disappear", "recolor", "reshape"}


def test_cli_video_world(tmp_path, capsys):
    out = tmp_path / "v"
    assert cli_main(["world", "--video", "--out", str(out), "--train", "3", "--test", "2", "--image-size", "32",
                     "--clip-seconds", "1.5", "--fps", "6", "--captions", "2"]) == 0
    meta = json.loads((out / "world.json").read_text())
    assert (meta["clip_seconds"], meta["fps"], meta["captions_per_clip"]) == (1.5, 6.0, 2)
    assert len(list((out / "train/videos").glob("*.mp4"))) == 3
    assert cli_main(["world", "--video", "--grounded", "--out", str(tmp_path / "g")]) == 2
    assert "--grounded and --max-objects are for images" in capsys.readouterr().err
    assert cli_main(["world", "--video", "--out", str(tmp_path / "f"), "--fps", "2", "--clip-seconds", "1"]) == 2
    assert "a clip needs at least 8 frames" in capsys.readouterr().err
