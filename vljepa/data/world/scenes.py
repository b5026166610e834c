"""Scenes of the built-in world: the vocabulary, sampling objects and their places, and drawing.

With at most three objects a scene puts each one in its own horizontal third. With more, objects
are smaller and placed anywhere on the image by rejection sampling, with clear gaps between them
and between their centres along x, so left-to-right order stays unambiguous in both layouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
# Words a caption may use for each size; questions and answers use the first.
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
THIRDS_MAX_OBJECTS = 3  # up to this many objects, one object per horizontal third
MAX_OBJECTS = 6
VERTICAL_MIN = 0.25  # captions and classic questions say "above"/"below" only when centres differ by this much
COORD_DIGITS = 4  # decimals of the centres stored in metadata.jsonl

Pair = tuple[str, str]  # (colour, shape)

RGB = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 185),
    "orange": (245, 140, 30),
}
_COLOR_JITTER = 10  # per-channel jitter of object colours; keeps the six colours apart
_RADIUS = {"small": 0.10, "large": 0.17}  # bounding radius, as a fraction of the image side
_CROWDED_RADIUS = {"small": 0.07, "large": 0.12}  # the same with more than three objects
_RADIUS_JITTER = 0.08
# Shapes are drawn inside their bounding circle. The circle is drawn a little smaller so
# that areas are closer across shapes: with these factors every large object has a larger
# area than every small object, whatever the shapes.
_CIRCLE_SCALE = 0.9
_STAR_INNER = 0.5
_EDGE = 0.02  # gap between an object and the image border
_GAP = 0.02  # gap between two objects in the thirds layout
_CROWDED_GAP = 0.04  # gap between two objects placed anywhere
_COLUMN_MARGIN = 0.06  # centres stay this far inside their third, so x order is clear
_MIN_DX = 0.1  # with more than three objects, centres differ at least this much along x
_TRIES = 50  # draws of one object's place before the whole placement starts again
_SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges at little cost
_N_HELD_OUT = 4


@dataclass(frozen=True)
class SceneObject:
    """One filled shape; positions and radius are fractions of the image side, y grows downwards."""

    color: str
    shape: str
    size: str
    x: float  # centre
    y: float
    r: float  # bounding radius

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """The random stream for ``key`` (e.g. split, image index) under ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def pick(rng: np.random.Generator, items: list):
    """One item of ``items``, uniformly."""
    return items[int(rng.integers(len(items)))]


def choose_held_out(rng: np.random.Generator) -> list[Pair]:
    """Four colour-shape pairs, no two sharing a colour or a shape, sorted."""
    colors = rng.choice(len(COLORS), _N_HELD_OUT, replace=False)
    shapes = rng.permutation(len(SHAPES))[:_N_HELD_OUT]
    return sorted((COLORS[c], SHAPES[s]) for c, s in zip(colors, shapes))


def stored(objects: list[SceneObject]) -> list[SceneObject]:
    """The objects with their centres rounded as metadata.jsonl stores them."""
    return [replace(o, x=round(o.x, COORD_DIGITS), y=round(o.y, COORD_DIGITS)) for o in objects]


def object_record(o: SceneObject) -> dict:
    """One object as a record's ``objects`` list holds it (pass it through :func:`stored` first)."""
    return {"color": o.color, "shape": o.shape, "size": o.size, "x": o.x, "y": o.y}


def _place(
    samplers: list[Callable[[], tuple[float, float]]], radii: list[float], gap: float
) -> list[tuple[float, float]] | None:
    """A centre for each object from its sampler, redrawn until the object keeps ``gap`` from those
    placed before it; None if one gets stuck."""
    placed: list[tuple[float, float, float]] = []
    for sample, r in zip(samplers, radii):
        for _ in range(_TRIES):
            x, y = sample()
            if all(math.hypot(x - px, y - py) >= r + pr + gap for px, py, pr in placed):
                placed.append((x, y, r))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def _place_in_thirds(
    rng: np.random.Generator, columns: list[int], radii: list[float]
) -> list[tuple[float, float]] | None:
    """Centres for objects in the given thirds, inside the image, not overlapping; None if stuck."""

    def sampler(column: int, r: float) -> Callable[[], tuple[float, float]]:
        x_lo = max(column / 3 + _COLUMN_MARGIN, r + _EDGE)
        x_hi = min((column + 1) / 3 - _COLUMN_MARGIN, 1 - r - _EDGE)
        return lambda: (rng.uniform(x_lo, x_hi), rng.uniform(r + _EDGE, 1 - r - _EDGE))

    return _place([sampler(c, r) for c, r in zip(columns, radii)], radii, _GAP)


def _place_anywhere(rng: np.random.Generator, radii: list[float]) -> list[tuple[float, float]] | None:
    """Centres anywhere in the image, increasing in x by at least ``_MIN_DX``, with gaps of
    ``_CROWDED_GAP`` between objects; None if stuck."""
    n = len(radii)
    lo = max(radii) + _EDGE
    slack = 1 - 2 * lo - (n - 1) * _MIN_DX
    # Sorted uniform offsets plus fixed steps: x uniform over the layouts that keep the spacing.
    xs = lo + np.sort(rng.uniform(0, slack, n)) + _MIN_DX * np.arange(n)

    def sampler(x: float, r: float) -> Callable[[], tuple[float, float]]:
        return lambda: (x, rng.uniform(r + _EDGE, 1 - r - _EDGE))

    return _place([sampler(x, r) for x, r in zip(xs.tolist(), radii)], radii, _CROWDED_GAP)


def sample_scene(
    rng: np.random.Generator, pairs: list[Pair], held_out: list[Pair] | None, max_objects: int
) -> list[SceneObject]:
    """1 to ``max_objects`` objects with unique (colour, shape), sorted left to right.

    ``pairs`` are the pairs to draw from; with ``held_out`` given, the scene also
    contains one of those pairs.
    """
    n = int(rng.integers(1, max_objects + 1))
    if held_out is None:
        chosen = [pairs[i] for i in rng.choice(len(pairs), n, replace=False)]
    else:
        first = pick(rng, held_out)
        rest = [p for p in pairs if p != first]
        chosen = [first] + [rest[i] for i in rng.choice(len(rest), n - 1, replace=False)]
        chosen = [chosen[i] for i in rng.permutation(n)]  # the held-out one goes anywhere
    sizes = [SIZES[int(i)] for i in rng.integers(len(SIZES), size=n)]
    thirds = max_objects <= THIRDS_MAX_OBJECTS
    radius = _RADIUS if thirds else _CROWDED_RADIUS
    radii = [radius[s] * (1 + rng.uniform(-_RADIUS_JITTER, _RADIUS_JITTER)) for s in sizes]
    if thirds:
        columns = sorted(int(c) for c in rng.choice(3, n, replace=False))
    centres = None
    while centres is None:  # placement always succeeds eventually; retries are rare
        centres = _place_in_thirds(rng, columns, radii) if thirds else _place_anywhere(rng, radii)
    return [
        SceneObject(color=c, shape=s, size=size, x=x, y=y, r=r)
        for (c, s), size, r, (x, y) in zip(chosen, sizes, radii, centres)
    ]


def draw(rng: np.random.Generator, objects: list[SceneObject], image_size: int) -> Image.Image:
    """Render the objects on a light grey background, anti-aliased."""
    grey = int(rng.integers(215, 246))
    background = tuple(int(v) for v in np.clip(grey + rng.integers(-5, 6, size=3), 0, 255))
    side = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), background)
    canvas = ImageDraw.Draw(img)
    for obj in objects:
        jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(RGB[obj.color]) + jitter, 0, 255))
        cx, cy, r = obj.x * side, obj.y * side, obj.r * side
        if obj.shape == "circle":
            rc = r * _CIRCLE_SCALE
            canvas.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), fill=fill)
        elif obj.shape == "square":
            h = r / math.sqrt(2)
            canvas.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
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
            canvas.polygon(points, fill=fill)
    return img.reduce(_SUPERSAMPLE)
