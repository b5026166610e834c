"""Grounded question families of the built-in world: questions that name an object and ask about
its place, its attributes or its relations to the others.

An object is named by a phrase that fits it alone in the scene: its colour ("the red object"),
its shape ("the square"), both ("the red square"), or, when the attribute asked about is one of
those, its size with the other one ("the small square"). A question is asked only where its answer
is clear: a position beyond a margin from the middle, a nearest or furthest object by a distance
ratio, a relation beyond a margin along its axis. Answers are computed from the centres as
metadata.jsonl stores them, so the stored objects reproduce every answer exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from vljepa.data.world.questions import RELATION_QUESTIONS
from vljepa.data.world.scenes import COUNT_WORDS, SIZE_WORDS, SceneObject, pick

SIDE_MARGIN = 0.15  # a position question needs the centre this far from the middle of the image
DISTANCE_RATIO = 1.3  # the nearest (furthest) object is this much nearer (further) than the runner-up
RELATION_MIN = 0.15  # a relation needs the centres this far apart along its axis

TEMPLATES = {
    "position_lr": "is the {name} on the left or the right of the image?",
    "position_tb": "is the {name} at the top or the bottom of the image?",
    "attribute_shape": "what shape is the {name}?",
    "attribute_color": "what color is the {name}?",
    "attribute_size": "what size is the {name}?",
    "nearest": "which object is nearest to the {name}?",
    "furthest": "which object is furthest from the {name}?",
    "share_color": "how many other objects have the same color as the {name}?",
    "share_shape": "how many other objects have the same shape as the {name}?",
    "relation_left": "is the {name} to the left of the {other}?",
    "relation_right": "is the {name} to the right of the {other}?",
    "relation_above": "is the {name} above the {other}?",
    "relation_below": "is the {name} below the {other}?",
}
TYPES = {
    "position_lr": "position",
    "position_tb": "position",
    "attribute_shape": "attribute",
    "attribute_color": "attribute",
    "attribute_size": "attribute",
    "nearest": "nearest",
    "furthest": "furthest",
    "share_color": "share_count",
    "share_shape": "share_count",
    "relation_left": "relation_yesno",
    "relation_right": "relation_yesno",
    "relation_above": "relation_yesno",
    "relation_below": "relation_yesno",
}
# What each image is asked: (families to draw from, how many questions).
_SLOTS = (
    (("position_lr",), 1),
    (("position_tb",), 1),
    (("attribute_shape", "attribute_color", "attribute_size"), 1),
    (("nearest",), 1),
    (("furthest",), 1),
    (("share_color", "share_shape"), 1),
    (("relation_left", "relation_right", "relation_above", "relation_below"), RELATION_QUESTIONS),
)
# Name forms: the attributes a name gives; a name without a shape ends in "object".
_REFER = (("color",), ("shape",), ("color", "shape"))
_ATTRIBUTE_FORMS = {
    "shape": (("color",), ("size", "color")),
    "color": (("shape",), ("size", "shape")),
    "size": _REFER,
}
_SHARE_FORMS = {
    "color": (("shape",), ("size", "shape"), ("color", "shape")),
    "shape": (("color",), ("size", "color"), ("color", "shape")),
}
_RELATIONS = {  # family -> (axis, True when the subject's coordinate is the smaller)
    "relation_left": ("x", True),
    "relation_right": ("x", False),
    "relation_above": ("y", True),  # y grows downwards
    "relation_below": ("y", False),
}

# A grounded question: (type, family, question, answer, accepted answers).
GroundedQuestion = tuple[str, str, str, str, list[str]]


class _Candidate(NamedTuple):
    """A question before its objects are named: ``subject`` is named with one of ``forms``,
    ``other`` (relations only) with one of ``_REFER``."""

    family: str
    answer: str
    answers: tuple[str, ...]
    subject: SceneObject
    forms: tuple[tuple[str, ...], ...]
    other: SceneObject | None = None


def _phrase(o: SceneObject, form: tuple[str, ...]) -> str:
    words = [getattr(o, a) for a in ("size", "color") if a in form]
    return " ".join(words + [o.shape if "shape" in form else "object"])


def _names(objects: list[SceneObject], o: SceneObject, forms: tuple[tuple[str, ...], ...]) -> list[str]:
    """The phrases of ``forms`` that name ``o`` and no other object of the scene."""
    return [
        _phrase(o, form)
        for form in forms
        if sum(all(getattr(p, a) == getattr(o, a) for a in form) for p in objects) == 1
    ]


def _name_answer(o: SceneObject) -> tuple[str, tuple[str, ...]]:
    return o.name, (o.name, f"{o.size} {o.name}")


def _position(objects: list[SceneObject]) -> list[_Candidate]:
    out = []
    for family, axis, words in (("position_lr", "x", ("left", "right")), ("position_tb", "y", ("top", "bottom"))):
        for o in objects:
            c = getattr(o, axis)
            if abs(c - 0.5) >= SIDE_MARGIN:
                answer = words[c > 0.5]
                out.append(_Candidate(family, answer, (answer,), o, _REFER))
    return out


def _attribute(objects: list[SceneObject]) -> list[_Candidate]:
    out = []
    for attr, forms in _ATTRIBUTE_FORMS.items():
        for o in objects:
            value = getattr(o, attr)
            accepted = SIZE_WORDS[value] if attr == "size" else (value,)
            out.append(_Candidate(f"attribute_{attr}", value, accepted, o, forms))
    return out


def _distance(objects: list[SceneObject]) -> list[_Candidate]:
    if len(objects) < 3:  # with one other object, "nearest" needs no comparison
        return []
    out = []
    for o in objects:
        others = sorted((p for p in objects if p is not o), key=lambda p: math.hypot(p.x - o.x, p.y - o.y))
        d = [math.hypot(p.x - o.x, p.y - o.y) for p in others]
        if d[1] > DISTANCE_RATIO * d[0]:
            out.append(_Candidate("nearest", *_name_answer(others[0]), o, _REFER))
        if d[-1] > DISTANCE_RATIO * d[-2]:
            out.append(_Candidate("furthest", *_name_answer(others[-1]), o, _REFER))
    return out


def _share(objects: list[SceneObject]) -> list[_Candidate]:
    if len(objects) < 2:
        return []
    out = []
    for attr, forms in _SHARE_FORMS.items():
        for o in objects:
            n = sum(getattr(p, attr) == getattr(o, attr) for p in objects if p is not o)
            out.append(_Candidate(f"share_{attr}", COUNT_WORDS[n], (COUNT_WORDS[n], str(n)), o, forms))
    return out


def _relation(objects: list[SceneObject]) -> list[_Candidate]:
    out = []
    for a in objects:
        for b in objects:
            for family, (axis, smaller) in _RELATIONS.items():
                d = getattr(a, axis) - getattr(b, axis)
                if a is not b and abs(d) >= RELATION_MIN:
                    answer = "yes" if (d < 0) == smaller else "no"
                    out.append(_Candidate(family, answer, (answer,), a, _REFER, b))
    return out


_CANDIDATES = (_position, _attribute, _distance, _share, _relation)


def _texts(objects: list[SceneObject], c: _Candidate) -> list[str]:
    """Every wording of ``c``: one per choice of unambiguous names."""
    others = _names(objects, c.other, _REFER) if c.other is not None else [""]
    template = TEMPLATES[c.family]
    return [template.format(name=n, other=m) for n in _names(objects, c.subject, c.forms) for m in others]


def _balanced_pick(rng: np.random.Generator, candidates: list[_Candidate]) -> _Candidate:
    """A family uniformly among those present, then an answer uniformly among that family's, then
    a candidate: yes/no and left/right come out balanced, and non-zero counts come up more often
    than scenes hold them."""
    family = pick(rng, sorted({c.family for c in candidates}))
    of_family = [c for c in candidates if c.family == family]
    answer = pick(rng, sorted({c.answer for c in of_family}))
    return pick(rng, [c for c in of_family if c.answer == answer])


def grounded_questions(rng: np.random.Generator, objects: list[SceneObject], asked: set[str]) -> list[GroundedQuestion]:
    """The grounded questions of one scene: per slot of ``_SLOTS`` as many distinct questions as
    asked for, where the scene has them; never a text in ``asked`` (which grows with each one)."""
    candidates = [c for make in _CANDIDATES for c in make(objects)]
    out = []
    for families, count in _SLOTS:
        pool = [c for c in candidates if c.family in families]
        for _ in range(count):
            while pool:
                c = _balanced_pick(rng, pool)
                pool.remove(c)
                texts = [t for t in _texts(objects, c) if t not in asked]
                if texts:
                    question = pick(rng, texts)
                    asked.add(question)
                    out.append((TYPES[c.family], c.family, question, c.answer, list(c.answers)))
                    break
    return out
