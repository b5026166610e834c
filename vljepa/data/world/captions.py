"""Captions of the built-in world: paraphrases that name every object left to right.

Where two objects sit clearly one above the other (``VERTICAL_MIN``), two of an image's
paraphrases also say so.
"""

from __future__ import annotations

from vljepa.data.world.scenes import COUNT_WORDS, SIZE_WORDS, VERTICAL_MIN, SceneObject

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
# Templates for four or more objects: {n} is the count word, {ltr} / {rtl} the objects listed
# left to right / right to left ("a small red circle, a large blue star and a ...").
_MANY_CAPTIONS = (
    "from left to right: {ltr}",
    "there are {n} objects: {ltr}, from left to right",
    "{ltr}, from left to right",
    "from right to left: {rtl}",
    "{n} objects, from left to right: {ltr}",
    "{n} objects: {rtl}, from right to left",
    "an image of {n} objects; from left to right: {ltr}",
)
MAX_CAPTIONS = min(len(t) for t in (*_CAPTIONS.values(), _MANY_CAPTIONS))
# Added to these templates (by index) when the scene has a clear vertical relation: the pair of
# objects furthest apart vertically, named by colour and shape as the questions name them.
_VERTICAL_CLAUSES = {1: ", and the {upper} is above the {lower}", 3: ", and the {lower} is below the {upper}"}


def vertical_pair(objects: list[SceneObject]) -> tuple[SceneObject, SceneObject] | None:
    """(upper, lower): the two objects furthest apart vertically, if at least ``VERTICAL_MIN``."""
    pairs = [(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :]]
    if not pairs:
        return None
    a, b = max(pairs, key=lambda p: abs(p[0].y - p[1].y))
    if abs(a.y - b.y) < VERTICAL_MIN:
        return None
    return (a, b) if a.y < b.y else (b, a)  # y grows downwards


def _listing(phrases: list[str]) -> str:
    """``a p1, a p2 and a p3``."""
    return ", ".join(f"a {p}" for p in phrases[:-1]) + f" and a {phrases[-1]}"


def _fill(template: str, phrases: list[str]) -> str:
    if len(phrases) in _CAPTIONS:
        return template.format(**dict(zip("abc", phrases)))
    return template.format(n=COUNT_WORDS[len(phrases)], ltr=_listing(phrases), rtl=_listing(phrases[::-1]))


def captions(objects: list[SceneObject], k: int) -> list[str]:
    """The first ``k`` templates for this object count, each with a fixed choice of size words.

    Captions depend only on what the scene shows, so two images with the same objects in the same
    order (and the same clear vertical relation) share one caption set. Retrieval counts a caption
    as a hit when its text equals a caption of the image; with randomly drawn paraphrases, an image's
    own set would miss the equally right paraphrases drawn for its twins, and R@1 would measure luck
    rather than the model.
    """
    vertical = vertical_pair(objects)
    templates = _CAPTIONS.get(len(objects), _MANY_CAPTIONS)
    out = []
    for t, template in enumerate(templates[:k]):
        phrases = [f"{SIZE_WORDS[o.size][t % 2]} {o.color} {o.shape}" for o in objects]
        caption = _fill(template, phrases)
        if vertical is not None and t in _VERTICAL_CLAUSES:
            upper, lower = vertical
            caption += _VERTICAL_CLAUSES[t].format(upper=upper.name, lower=lower.name)
        out.append(caption)
    return out
