"""The classic question types of the built-in world: colour, shape, size, count, exist, relation
and yes/no, each asked only where the scene makes its answer unambiguous."""

from __future__ import annotations

import numpy as np

from vljepa.data.world.scenes import (
    COLORS,
    COUNT_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    VERTICAL_MIN,
    Pair,
    SceneObject,
    pick,
)

# A question: (type, question, answer, accepted answers).
Question = tuple[str, str, str, list[str]]
# Relations are the hardest skill (two objects found, then compared) and a scene has several, so
# multi-object images get up to this many distinct relation questions.
RELATION_QUESTIONS = 3


def _yes_no(rng: np.random.Generator) -> bool:
    return bool(rng.integers(2))


def _q_color(rng: np.random.Generator, objects: list[SceneObject], forbidden: set[Pair]) -> Question | None:
    asks = []
    for o in objects:
        same_shape = [p for p in objects if p.shape == o.shape]
        if len(same_shape) == 1:
            asks.append((f"what color is the {o.shape}?", o))
        elif sum(p.size == o.size for p in same_shape) == 1:
            asks.append((f"what color is the {o.size} {o.shape}?", o))
    if not asks:
        return None
    question, o = pick(rng, asks)
    return "color", question, o.color, [o.color]


def _q_shape(rng: np.random.Generator, objects: list[SceneObject], forbidden: set[Pair]) -> Question | None:
    unique = [o for o in objects if sum(p.color == o.color for p in objects) == 1]
    if not unique:
        return None
    o = pick(rng, unique)
    return "shape", f"what shape is the {o.color} object?", o.shape, [o.shape]


def _q_size(rng: np.random.Generator, objects: list[SceneObject], forbidden: set[Pair]) -> Question:
    o = pick(rng, objects)
    return "size", f"what size is the {o.name}?", o.size, list(SIZE_WORDS[o.size])


def _q_count(rng: np.random.Generator, objects: list[SceneObject], forbidden: set[Pair]) -> Question:
    if _yes_no(rng):
        question, n = "how many objects are there?", len(objects)
    else:
        # Half the time a shape in the scene, so that "zero" does not dominate.
        shape = pick(rng, objects).shape if _yes_no(rng) else pick(rng, list(SHAPES))
        question, n = f"how many {shape}s are there?", sum(o.shape == shape for o in objects)
    return "count", question, COUNT_WORDS[n], [COUNT_WORDS[n], str(n)]


def _q_exist(rng: np.random.Generator, objects: list[SceneObject], forbidden: set[Pair]) -> Question:
    if _yes_no(rng):
        o = pick(rng, objects)
        return "exist", f"is there a {o.name}?", "yes", ["yes"]
    # A near miss: an object in the scene with its colour or its shape changed.
    present = {(o.color, o.shape) for o in objects}
    misses = sorted(
        {(c, o.shape) for o in objects for c in COLORS} | {(o.color, s) for o in objects for s in SHAPES}
    )
    misses = [p for p in misses if p not in present and p not in forbidden]
    color, shape = pick(rng, misses)
    return "exist", f"is there a {color} {shape}?", "no", ["no"]


def _q_relation(rng: np.random.Generator, objects: list[SceneObject], forbidden: set[Pair]) -> Question | None:
    if len(objects) < 2:
        return None
    if _yes_no(rng):
        # "What is left/right of X?" only where exactly one object is on that side: with
        # objects sorted left to right, left of the second one and right of the last but one.
        asks = [(objects[1], "left", objects[0]), (objects[-2], "right", objects[-1])]
        o, side, answer = pick(rng, asks)
        return (
            "relation",
            f"what is to the {side} of the {o.name}?",
            answer.name,
            [answer.name, f"{answer.size} {answer.name}"],
        )
    i, j = (int(v) for v in rng.choice(len(objects), 2, replace=False))
    a, b = objects[i], objects[j]
    vertical = abs(a.y - b.y) >= VERTICAL_MIN and _yes_no(rng)
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


def _q_yesno(rng: np.random.Generator, objects: list[SceneObject], forbidden: set[Pair]) -> Question:
    yes = _yes_no(rng)
    answer = "yes" if yes else "no"
    unique_shape = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
    if unique_shape and _yes_no(rng):
        o = pick(rng, unique_shape)
        colors = [c for c in COLORS if c != o.color and (c, o.shape) not in forbidden]
        color = o.color if yes else pick(rng, colors)
        return "yesno", f"is the {o.shape} {color}?", answer, [answer]
    o = pick(rng, objects)
    size = o.size if yes else next(s for s in SIZES if s != o.size)
    return "yesno", f"is the {o.name} {size}?", answer, [answer]


_QUESTIONS = (_q_color, _q_shape, _q_size, _q_count, _q_exist, _q_relation, _q_yesno)


def questions(rng: np.random.Generator, objects: list[SceneObject], forbidden: set[Pair]) -> list[Question]:
    """One question of each type (up to ``RELATION_QUESTIONS`` distinct relation questions); a
    type is left out where it would be ambiguous. No question names a pair in ``forbidden``."""
    out = [q for ask in _QUESTIONS if (q := ask(rng, objects, forbidden)) is not None]
    asked = {q[1] for q in out}
    for _ in range(RELATION_QUESTIONS - 1):
        q = _q_relation(rng, objects, forbidden)
        if q is not None and q[1] not in asked:
            out.append(q)
            asked.add(q[1])
    return out
