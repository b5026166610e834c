"""Write a grounded VQA data set unlike the built-in world, for testing a VQA recipe on new data.

    python scripts/make_grounded_vqa.py --out data/grounded_vqa --train 4000 --test 500 --seed 0

Each image (96 px by default) holds two to five shapes (disk, box, diamond, cross, ring), each in a
different colour (crimson, teal, amber, violet, lime, navy), on a noisy background. Questions ask
where an object named by its colour is (``position``: left / right, top / bottom), which shape has a
colour or which colour a shape has when only one object has that shape (``attribute``), and yes/no
relations between two named objects (``relation``, half of them "yes"). A question is written only
where its answer is clear: positions and relations need centres well apart from the middle or from
each other.

Output: ``DIR/{train,test}/images/*.png`` and ``DIR/{train,test}/metadata.jsonl``, one question a
line: ``file_name``, ``question``, ``answer``, ``answers``, ``type`` and the image's ``objects``
(``color``, ``shape``, centre ``x``, ``y`` and radius ``r`` as fractions of the side, y downwards),
from which every answer can be checked. Deterministic for a seed; each image has its own stream.
Draws its own scenes and words its own questions: nothing is shared with ``vljepa.data.world``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {
    "crimson": (196, 22, 58),
    "teal": (0, 134, 128),
    "amber": (250, 186, 10),
    "violet": (150, 70, 230),
    "lime": (120, 220, 40),
    "navy": (20, 30, 120),
}
SHAPES = ("disk", "box", "diamond", "cross", "ring")
MIN_OBJECTS, MAX_OBJECTS = 2, 5
RADIUS = (0.08, 0.13)  # radius range, as a fraction of the image side
BORDER = 0.03  # space between an object and the image edge
SPACING = 0.05  # space between two objects
SIDE_MARGIN = 0.12  # a position question needs the centre this far from the middle
RELATION_MARGIN = 0.15  # a relation needs the centres this far apart along its axis
RELATIONS_PER_IMAGE = 2
SUPERSAMPLE = 3
SPLITS = ("train", "test")

POSITION_WORDING = {
    "x": ("where is the {name}, left side or right side?", ("left", "right")),
    "y": ("is the {name} closer to the top edge or the bottom edge?", ("top", "bottom")),
}
SHAPE_OF_COLOR = "which shape is {color}?"
COLOR_OF_SHAPE = "which colour is the {shape}?"
RELATION_WORDING = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
RELATION_QUESTION = "is the {a} {relation} the {b}?"


def sample_objects(rng: np.random.Generator) -> list[dict]:
    """2-5 objects with distinct colours, placed apart from each other and from the edges."""
    while True:
        n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
        colors = [list(PALETTE)[i] for i in rng.choice(len(PALETTE), n, replace=False)]
        objects: list[dict] = []
        for color in colors:
            r = float(rng.uniform(*RADIUS))
            for _ in range(100):
                x, y = (float(v) for v in rng.uniform(r + BORDER, 1 - r - BORDER, size=2))
                if all(math.hypot(x - o["x"], y - o["y"]) >= r + o["r"] + SPACING for o in objects):
                    shape = SHAPES[int(rng.integers(len(SHAPES)))]
                    objects.append({"color": color, "shape": shape,
                                    "x": round(x, 4), "y": round(y, 4), "r": round(r, 4)})
                    break
            else:
                break  # no room: sample the scene again
        if len(objects) == n:
            return objects


def render(rng: np.random.Generator, objects: list[dict], size: int) -> Image.Image:
    """Draw the objects supersampled, downsample, and add pixel noise over the whole image."""
    side = size * SUPERSAMPLE
    base = rng.integers(200, 236, size=3)
    img = Image.new("RGB", (side, side), tuple(int(v) for v in base))
    pen = ImageDraw.Draw(img)
    for o in objects:
        fill = tuple(int(v) for v in np.clip(np.array(PALETTE[o["color"]]) + rng.integers(-12, 13, size=3), 0, 255))
        cx, cy, r = o["x"] * side, o["y"] * side, o["r"] * side
        if o["shape"] == "disk":
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "ring":
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(0.4 * r)))
        elif o["shape"] == "box":
            h = 0.8 * r
            pen.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif o["shape"] == "diamond":
            pen.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fill)
        else:  # cross: a plus sign
            w = 0.3 * r
            pen.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
            pen.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    small = np.asarray(img.resize((size, size), Image.Resampling.LANCZOS)).astype(np.int16)
    noisy = small + rng.normal(0, 4, size=small.shape).round().astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _coin(rng: np.random.Generator) -> bool:
    return bool(rng.integers(2))


def _choice(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _name(o: dict) -> str:
    return f"{o['color']} {o['shape']}"


def position_questions(rng: np.random.Generator, objects: list[dict]) -> list[tuple[str, str, str]]:
    """Per axis, one object clearly on one side (the side drawn first, so both come up equally)."""
    out = []
    for axis, (wording, sides) in POSITION_WORDING.items():
        clear = [o for o in objects if abs(o[axis] - 0.5) >= SIDE_MARGIN]
        if not clear:
            continue
        want_first = _coin(rng)
        on_side = [o for o in clear if (o[axis] < 0.5) == want_first] or clear
        o = _choice(rng, on_side)
        name = _name(o) if _coin(rng) else f"{o['color']} one"
        out.append(("position", wording.format(name=name), sides[0] if o[axis] < 0.5 else sides[1]))
    return out


def attribute_questions(rng: np.random.Generator, objects: list[dict]) -> list[tuple[str, str, str]]:
    """The shape of one object (named by its colour), and the colour of one whose shape is unique."""
    o = _choice(rng, objects)
    out = [("attribute", SHAPE_OF_COLOR.format(color=o["color"]), o["shape"])]
    unique = [o for o in objects if sum(p["shape"] == o["shape"] for p in objects) == 1]
    if unique:
        o = _choice(rng, unique)
        out.append(("attribute", COLOR_OF_SHAPE.format(shape=o["shape"]), o["color"]))
    return out


def relation_questions(rng: np.random.Generator, objects: list[dict], n: int = RELATIONS_PER_IMAGE
                       ) -> list[tuple[str, str, str]]:
    """Up to ``n`` distinct yes/no relations between two objects clearly apart on the relation's axis."""
    clear = []
    for a in objects:
        for b in objects:
            for axis, before, after in (("x", "left", "right"), ("y", "above", "below")):
                if a is not b and abs(a[axis] - b[axis]) >= RELATION_MARGIN:
                    clear.append((a, b, before if a[axis] < b[axis] else after, after if a[axis] < b[axis] else before))
    out: list[tuple[str, str, str]] = []
    for _ in range(n):
        if not clear:
            break
        a, b, truth, other = clear.pop(int(rng.integers(len(clear))))
        yes = _coin(rng)
        relation = RELATION_WORDING[truth if yes else other]
        question = RELATION_QUESTION.format(a=_name(a), relation=relation, b=_name(b))
        out.append(("relation", question, "yes" if yes else "no"))
    return out


def write_split(out: Path, split_key: int, n: int, *, seed: int, image_size: int,
                relations: int = RELATIONS_PER_IMAGE) -> int:
    """Write ``n`` images and their questions under ``out``; returns the number of questions."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    count = 0
    with (out / "metadata.jsonl").open("w", encoding="utf-8") as meta:
        for i in range(n):
            rng = np.random.default_rng([seed, split_key, i])
            objects = sample_objects(rng)
            file_name = f"images/{i:05d}.png"
            render(rng, objects, image_size).save(out / file_name)
            qs = position_questions(rng, objects) + attribute_questions(rng, objects) + relation_questions(rng, objects, relations)
            for qtype, question, answer in qs:
                record = {"file_name": file_name, "question": question, "answer": answer, "answers": [answer],
                          "type": qtype, "objects": objects}
                meta.write(json.dumps(record) + "\n")
            count += len(qs)
    return count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="output folder; train/ and test/ are written in it")
    p.add_argument("--train", type=int, default=4000, help="training images (default 4000)")
    p.add_argument("--test", type=int, default=500, help="test images (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96, help="image side in pixels, at least 32 (default 96)")
    p.add_argument("--relations", type=int, default=RELATIONS_PER_IMAGE,
                   help=f"relation questions per training image, at most (default {RELATIONS_PER_IMAGE}; "
                        f"test images always get {RELATIONS_PER_IMAGE})")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--train", args.train), ("--test", args.test)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.relations < 0:
        parser.error(f"--relations must be at least 0, got {args.relations}")
    if args.image_size < 32:
        parser.error(f"--image-size must be at least 32, got {args.image_size}")
    for key, (split, n) in enumerate(zip(SPLITS, (args.train, args.test))):
        questions = write_split(Path(args.out) / split, key, n, seed=args.seed, image_size=args.image_size,
                                relations=args.relations if split == "train" else RELATIONS_PER_IMAGE)
        print(f"{split}: {n} images, {questions} questions in {Path(args.out) / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
