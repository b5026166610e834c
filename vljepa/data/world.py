"""The built-in procedural world: seeded 2-D scenes with captions and questions.

Each image holds one to three filled shapes, each with a colour, a shape and a size, placed
in distinct horizontal thirds so that left-to-right order is never ambiguous. Captions and
questions are derived from the scene, so every answer is checkable from the ``objects``
stored with each image. Captions name every object left to right; where two objects sit clearly
one above the other (the gap at which questions ask "above" / "below"), two of an image's
paraphrases also say so.

The world is written in the on-disk split format (:mod:`vljepa.data.formats`) and is read
back through the same readers as user data::

    <out>/world.json
    <out>/{train,test,comp}/images/000000.png
    <out>/{train,test,comp}/metadata.jsonl     captions + objects (+ label for one object)
    <out>/{train,test,comp}/questions.jsonl    VQA records

Compositional generalisation: four colour-shape pairs (no two sharing a colour or a shape)
never appear in ``train`` or ``test``; every ``comp`` image contains at least one of them.

Every random draw for image ``i`` of a split comes from its own stream, seeded by
``(seed, split, i)``, so a split does not change when the size of another one does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
# Words a caption may use for each size; questions and answers use the first.
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}

_Pair = tuple[str, str]  # (colour, shape)

_RGB = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 185),
    "orange": (245, 140, 30),
}
_COLOR_JITTER = 10  # per-channel jitter of object colours; keeps the six colours apart
_RADIUS = {"small": 0.10, "large": 0.17}  # bounding radius, as a fraction of the image side
_RADIUS_JITTER = 0.08
# Shapes are drawn inside their bounding circle. The circle is drawn a little smaller so
# that areas are closer across shapes: with these factors every large object has a larger
# area than every small object, whatever the shapes.
_CIRCLE_SCALE = 0.9
_STAR_INNER = 0.5
_EDGE = 0.02  # gap between an object and the image border
_GAP = 0.02  # gap between two objects
_COLUMN_MARGIN = 0.06  # centres stay this far inside their third, so x order is clear
_VERTICAL_MIN = 0.25  # "above"/"below" is asked only when centres differ by this much
_SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges at little cost
_N_HELD_OUT = 4
# Relations are the hardest skill (two objects found, then compared) and a scene has several, so
# multi-object images get up to this many distinct relation questions.
_RELATION_QUESTIONS = 3
_COUNT_WORDS = ("zero", "one", "two", "three")
_SPLITS = ("train", "test", "comp")
_HELD_OUT_STREAM = len(_SPLITS)  # spawn key of the stream that picks held-out pairs

# Caption templates by object count; objects are given left to right as a, b, c (each
# "size colour shape", without article). All templates of a count carry the same facts.
_CAPTIONS = {
    1: (
        "a {a}",
        "a single {a}",
        "one {a}",
        "there is one object: a {a}",
        "an image of a {a}",
        "just a {a} on a plain background",
        "a picture with only a {a} in it",
    ),
    2: (
        "a {a} to the left of a {b}",
        "a {b} to the right of a {a}",
        "from left to right: a {a} and a {b}",
        "there are two objects: a {a} on the left and a {b} on the right",
        "a {a} on the left and a {b} on the right",
        "on the right a {b}, on the left a {a}",
        "a {b} with a {a} to its left",
    ),
    3: (
        "from left to right: a {a}, a {b} and a {c}",
        "there are three objects: a {a} on the left, a {b} in the middle and a {c} on the right",
        "a {a}, a {b} and a {c}, from left to right",
        "a {b} between a {a} on the left and a {c} on the right",
        "from right to left: a {c}, a {b} and a {a}",
        "a {a} to the left of a {b}, which is to the left of a {c}",
        "three objects: a {c} on the right, a {b} in the middle and a {a} on the left",
    ),
}
MAX_CAPTIONS = min(len(t) for t in _CAPTIONS.values())
# Added to these templates (by index) when the scene has a clear vertical relation: the pair of
# objects furthest apart vertically, named by colour and shape as the questions name them.
_VERTICAL_CLAUSES = {1: ", and the {upper} is above the {lower}", 3: ", and the {lower} is below the {upper}"}


@dataclass(frozen=True)
class _Object:
    color: str
    shape: str
    size: str
    x: float  # centre, as a fraction of the image side
    y: float
    r: float  # bounding radius, as a fraction of the image side

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class WorldInfo:
    """What :func:`generate_world` wrote."""

    root: Path
    splits: dict[str, int]  # split name -> number of images
    held_out: list[tuple[str, str]]  # (colour, shape) pairs absent from train and test
    answers: list[str]  # sorted answer vocabulary over all splits
    classes: list[str]  # every "colour shape" string


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _choose_held_out(seed: int) -> list[_Pair]:
    rng = _rng(seed, _HELD_OUT_STREAM)
    # Four distinct colours matched to the four shapes: no colour or shape repeats.
    colors = rng.choice(len(COLORS), _N_HELD_OUT, replace=False)
    shapes = rng.permutation(len(SHAPES))[:_N_HELD_OUT]
    return sorted((COLORS[c], SHAPES[s]) for c, s in zip(colors, shapes))


def _place(
    rng: np.random.Generator, columns: list[int], radii: list[float]
) -> list[tuple[float, float]] | None:
    """Centres for objects in the given thirds, inside the image, not overlapping; None if stuck."""
    placed: list[tuple[float, float, float]] = []
    for column, r in zip(columns, radii):
        x_lo = max(column / 3 + _COLUMN_MARGIN, r + _EDGE)
        x_hi = min((column + 1) / 3 - _COLUMN_MARGIN, 1 - r - _EDGE)
        for _ in range(50):
            x, y = rng.uniform(x_lo, x_hi), rng.uniform(r + _EDGE, 1 - r - _EDGE)
            if all(math.hypot(x - px, y - py) >= r + pr + _GAP for px, py, pr in placed):
                placed.append((x, y, r))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def _sample_scene(
    rng: np.random.Generator, pairs: list[_Pair], held_out: list[_Pair] | None
) -> list[_Object]:
    """1-3 objects with unique (colour, shape), sorted left to right.

    ``pairs`` are the pairs to draw from; with ``held_out`` given, the scene also
    contains one of those pairs.
    """
    n = int(rng.integers(1, 4))
    if held_out is None:
        chosen = [pairs[i] for i in rng.choice(len(pairs), n, replace=False)]
    else:
        first = _pick(rng, held_out)
        rest = [p for p in pairs if p != first]
        chosen = [first] + [rest[i] for i in rng.choice(len(rest), n - 1, replace=False)]
        chosen = [chosen[i] for i in rng.permutation(n)]  # the held-out one goes anywhere
    sizes = [SIZES[int(i)] for i in rng.integers(len(SIZES), size=n)]
    radii = [_RADIUS[s] * (1 + rng.uniform(-_RADIUS_JITTER, _RADIUS_JITTER)) for s in sizes]
    columns = sorted(int(c) for c in rng.choice(3, n, replace=False))
    centres = None
    while centres is None:  # placement always succeeds eventually; retries are rare
        centres = _place(rng, columns, radii)
    return [
        _Object(color=c, shape=s, size=size, x=x, y=y, r=r)
        for (c, s), size, r, (x, y) in zip(chosen, sizes, radii, centres)
    ]


def _draw(rng: np.random.Generator, objects: list[_Object], image_size: int) -> Image.Image:
    grey = int(rng.integers(215, 246))
    background = tuple(int(v) for v in np.clip(grey + rng.integers(-5, 6, size=3), 0, 255))
    side = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(_RGB[obj.color]) + jitter, 0, 255))
        cx, cy, r = obj.x * side, obj.y * side, obj.r * side
        if obj.shape == "circle":
            rc = r * _CIRCLE_SCALE
            draw.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), fill=fill)
        elif obj.shape == "square":
            h = r / math.sqrt(2)
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            # A triangle or star pointing up: vertices on circles around the centre.
            if obj.shape == "triangle":
                radii, angles = [r] * 3, [-90 + 120 * k for k in range(3)]
            else:
                radii = [r if k % 2 == 0 else r * _STAR_INNER for k in range(10)]
                angles = [-90 + 36 * k for k in range(10)]
            points = [
                (cx + rr * math.cos(math.radians(a)), cy + rr * math.sin(math.radians(a)))
                for rr, a in zip(radii, angles)
            ]
            draw.polygon(points, fill=fill)
    return img.reduce(_SUPERSAMPLE)


def _vertical_pair(objects: list[_Object]) -> tuple[_Object, _Object] | None:
    """(upper, lower): the two objects furthest apart vertically, if at least ``_VERTICAL_MIN``."""
    pairs = [(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :]]
    if not pairs:
        return None
    a, b = max(pairs, key=lambda p: abs(p[0].y - p[1].y))
    if abs(a.y - b.y) < _VERTICAL_MIN:
        return None
    return (a, b) if a.y < b.y else (b, a)  # y grows downwards


def _captions(objects: list[_Object], k: int) -> list[str]:
    """The first ``k`` templates for this object count, each with a fixed choice of size words.

    Captions depend only on what the scene shows, so two images with the same objects in the same
    order (and the same clear vertical relation) share one caption set. Retrieval counts a caption
    as a hit when its text equals a caption of the image; with randomly drawn paraphrases, an image's
    own set would miss the equally right paraphrases drawn for its twins, and R@1 would measure luck
    rather than the model.
    """
    vertical = _vertical_pair(objects)
    captions = []
    for t, template in enumerate(_CAPTIONS[len(objects)][:k]):
        phrases = [f"{SIZE_WORDS[o.size][t % 2]} {o.color} {o.shape}" for o in objects]
        caption = template.format(**dict(zip("abc", phrases)))
        if vertical is not None and t in _VERTICAL_CLAUSES:
            upper, lower = vertical
            caption += _VERTICAL_CLAUSES[t].format(upper=upper.name, lower=lower.name)
        captions.append(caption)
    return captions


# A question: (type, question, answer, accepted answers).
_Question = tuple[str, str, str, list[str]]


def _yes_no(rng: np.random.Generator) -> bool:
    return bool(rng.integers(2))


def _q_color(rng: np.random.Generator, objects: list[_Object], forbidden: set[_Pair]) -> _Question | None:
    asks = []
    for o in objects:
        same_shape = [p for p in objects if p.shape == o.shape]
        if len(same_shape) == 1:
            asks.append((f"what color is the {o.shape}?", o))
        elif sum(p.size == o.size for p in same_shape) == 1:
            asks.append((f"what color is the {o.size} {o.shape}?", o))
    if not asks:
        return None
    question, o = _pick(rng, asks)
    return "color", question, o.color, [o.color]


def _q_shape(rng: np.random.Generator, objects: list[_Object], forbidden: set[_Pair]) -> _Question | None:
    unique = [o for o in objects if sum(p.color == o.color for p in objects) == 1]
    if not unique:
        return None
    o = _pick(rng, unique)
    return "shape", f"what shape is the {o.color} object?", o.shape, [o.shape]


def _q_size(rng: np.random.Generator, objects: list[_Object], forbidden: set[_Pair]) -> _Question:
    o = _pick(rng, objects)
    return "size", f"what size is the {o.name}?", o.size, list(SIZE_WORDS[o.size])


def _q_count(rng: np.random.Generator, objects: list[_Object], forbidden: set[_Pair]) -> _Question:
    if _yes_no(rng):
        question, n = "how many objects are there?", len(objects)
    else:
        # Half the time a shape in the scene, so that "zero" does not dominate.
        shape = _pick(rng, objects).shape if _yes_no(rng) else _pick(rng, list(SHAPES))
        question, n = f"how many {shape}s are there?", sum(o.shape == shape for o in objects)
    return "count", question, _COUNT_WORDS[n], [_COUNT_WORDS[n], str(n)]


def _q_exist(rng: np.random.Generator, objects: list[_Object], forbidden: set[_Pair]) -> _Question:
    if _yes_no(rng):
        o = _pick(rng, objects)
        return "exist", f"is there a {o.name}?", "yes", ["yes"]
    # A near miss: an object in the scene with its colour or its shape changed.
    present = {(o.color, o.shape) for o in objects}
    misses = sorted(
        {(c, o.shape) for o in objects for c in COLORS} | {(o.color, s) for o in objects for s in SHAPES}
    )
    misses = [p for p in misses if p not in present and p not in forbidden]
    color, shape = _pick(rng, misses)
    return "exist", f"is there a {color} {shape}?", "no", ["no"]


def _q_relation(rng: np.random.Generator, objects: list[_Object], forbidden: set[_Pair]) -> _Question | None:
    if len(objects) < 2:
        return None
    if _yes_no(rng):
        # "What is left/right of X?" only where exactly one object is on that side: with
        # objects sorted left to right, left of the second one and right of the last but one.
        asks = [(objects[1], "left", objects[0]), (objects[-2], "right", objects[-1])]
        o, side, answer = _pick(rng, asks)
        return (
            "relation",
            f"what is to the {side} of the {o.name}?",
            answer.name,
            [answer.name, f"{answer.size} {answer.name}"],
        )
    i, j = (int(v) for v in rng.choice(len(objects), 2, replace=False))
    a, b = objects[i], objects[j]
    vertical = abs(a.y - b.y) >= _VERTICAL_MIN and _yes_no(rng)
    if vertical:
        truth, other = ("above", "below") if a.y < b.y else ("below", "above")  # y grows downwards
    else:
        truth, other = ("to the left of", "to the right of")
        if a.x > b.x:
            truth, other = other, truth
    yes = _yes_no(rng)
    relation = truth if yes else other
    answer = "yes" if yes else "no"
    return "relation", f"is the {a.name} {relation} the {b.name}?", answer, [answer]


def _q_yesno(rng: np.random.Generator, objects: list[_Object], forbidden: set[_Pair]) -> _Question:
    yes = _yes_no(rng)
    answer = "yes" if yes else "no"
    unique_shape = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
    if unique_shape and _yes_no(rng):
        o = _pick(rng, unique_shape)
        colors = [c for c in COLORS if c != o.color and (c, o.shape) not in forbidden]
        color = o.color if yes else _pick(rng, colors)
        return "yesno", f"is the {o.shape} {color}?", answer, [answer]
    o = _pick(rng, objects)
    size = o.size if yes else next(s for s in SIZES if s != o.size)
    return "yesno", f"is the {o.name} {size}?", answer, [answer]


_QUESTIONS = (_q_color, _q_shape, _q_size, _q_count, _q_exist, _q_relation, _q_yesno)


def _questions(rng: np.random.Generator, objects: list[_Object], forbidden: set[_Pair]) -> list[_Question]:
    """One question of each type (up to ``_RELATION_QUESTIONS`` distinct relation questions); a
    type is left out where it would be ambiguous."""
    out = [q for ask in _QUESTIONS if (q := ask(rng, objects, forbidden)) is not None]
    asked = {q[1] for q in out}
    for _ in range(_RELATION_QUESTIONS - 1):
        q = _q_relation(rng, objects, forbidden)
        if q is not None and q[1] not in asked:
            out.append(q)
            asked.add(q[1])
    return out


def _write_split(
    split_dir: Path,
    split_key: int,
    n: int,
    *,
    seed: int,
    pairs: list[_Pair],
    held_out: list[_Pair] | None,
    forbidden: set[_Pair],
    image_size: int,
    captions_per_image: int,
    progress: bool,
) -> set[str]:
    """Write one split folder; returns the answers it used."""
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    answers: set[str] = set()
    with (split_dir / "metadata.jsonl").open("w") as meta, (split_dir / "questions.jsonl").open("w") as qs:
        for i in tqdm(range(n), desc=split_dir.name, disable=not progress):
            rng = _rng(seed, split_key, i)
            objects = _sample_scene(rng, pairs, held_out)
            file_name = f"images/{i:06d}.png"
            _draw(rng, objects, image_size).save(split_dir / file_name)
            record = {
                "file_name": file_name,
                "captions": _captions(objects, captions_per_image),
                "objects": [
                    {"color": o.color, "shape": o.shape, "size": o.size, "x": round(o.x, 4), "y": round(o.y, 4)}
                    for o in objects
                ],
            }
            if len(objects) == 1:
                record["label"] = objects[0].name
            meta.write(json.dumps(record) + "\n")
            for qtype, question, answer, accepted in _questions(rng, objects, forbidden):
                answers.add(answer)
                q = {
                    "file_name": file_name,
                    "question": question,
                    "answer": answer,
                    "answers": accepted,
                    "type": qtype,
                }
                qs.write(json.dumps(q) + "\n")
    return answers


def generate_world(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 8000,
    n_test: int = 1000,
    n_comp: int = 500,
    image_size: int = 128,
    captions_per_image: int = 5,
    progress: bool = False,
) -> WorldInfo:
    """Generate the built-in world under ``out_dir`` (deterministic for a seed).

    Writes ``train``, ``test`` and ``comp`` split folders and ``world.json``; see the
    module docstring for the layout. ``captions_per_image`` is at most ``MAX_CAPTIONS``
    (each caption of an image comes from a different template).
    """
    if not 1 <= captions_per_image <= MAX_CAPTIONS:
        raise ValueError(f"captions_per_image must be in 1..{MAX_CAPTIONS}, got {captions_per_image}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    root = Path(out_dir)
    held_out = _choose_held_out(seed)
    all_pairs = [(c, s) for c in COLORS for s in SHAPES]
    seen_pairs = [p for p in all_pairs if p not in held_out]
    sizes = {"train": n_train, "test": n_test, "comp": n_comp}
    answers: set[str] = set()
    for key, split in enumerate(_SPLITS):
        comp = split == "comp"
        answers |= _write_split(
            root / split,
            key,
            sizes[split],
            seed=seed,
            pairs=all_pairs if comp else seen_pairs,
            held_out=held_out if comp else None,
            # Outside comp, no question may name a held-out pair, even to answer "no".
            forbidden=set() if comp else set(held_out),
            image_size=image_size,
            captions_per_image=captions_per_image,
            progress=progress,
        )
    info = WorldInfo(
        root=root,
        splits=sizes,
        held_out=held_out,
        answers=sorted(answers),
        classes=[f"{c} {s}" for c, s in all_pairs],
    )
    world = {
        "seed": seed,
        "image_size": image_size,
        "captions_per_image": captions_per_image,
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "held_out": [list(p) for p in held_out],
        "splits": sizes,
        "answers": info.answers,
        "classes": info.classes,
    }
    (root / "world.json").write_text(json.dumps(world, indent=2) + "\n")
    return info
