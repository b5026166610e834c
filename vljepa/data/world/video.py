"""Video clips of the built-in world: a scene in which one thing happens.

Each clip starts from a scene of :mod:`~vljepa.data.world.scenes` and shows one event on one
object: it moves (left, right, up or down), appears, disappears, changes colour or changes shape.
A move takes a stretch of the clip; the other events happen from one frame to the next. Every
event starts after the first quarter of the clip and is over before its last quarter, so frames
spread evenly over the clip see both the scene before and the scene after.

A split folder holds ``videos/NNNNNN.mp4`` (H.264, :func:`~vljepa.data.readers.video.write_video`),
``metadata.jsonl`` with one caption record per clip (captions of the event, the timestamped
``events``, the objects at the start and at the end) and ``questions.jsonl`` with questions
about what happened, in the documented format (:mod:`vljepa.data.formats`)::

    {"video": "videos/000000.mp4", "start": 0.0, "end": 2.0, "captions": ["the red circle moves to the left", ...],
     "events": [{"start": 0.5, "end": 1.25, "text": "the red circle moves to the left"}], "objects": [...],
     "objects_end": [...]}
    {"video": "videos/000000.mp4", "start": 0.0, "end": 2.0, "question": "what happened to the red circle?",
     "answer": "it moved left", "answers": ["it moved left"], "type": "event"}

Every random draw of clip ``i`` of a split comes from the stream ``(seed, split, i)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vljepa.data.readers.video import write_video
from vljepa.data.world.scenes import (
    COLORS,
    COUNT_WORDS,
    SHAPES,
    SIZES,
    THIRDS_MAX_OBJECTS,
    SceneObject,
    draw,
    object_record,
    pick,
    rng_for,
    sample_scene,
    stored,
)
from vljepa.data.world.write import WorldInfo

VIDEO_SPLITS = ("train", "test")
KINDS = ("move", "appear", "disappear", "recolor", "reshape")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # y grows downwards
_DIRECTION_WORDS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
# Five paraphrases per kind; {a} is the object ("red circle"), {d} the direction, {c} / {s} the new
# colour / shape. An event's text is the first.
_TEMPLATES = {
    "move": ("the {a} moves {d}", "the {a} slides {d}", "a {a} moving {d}", "the {a} travels {d}", "the {a} goes {d}"),
    "appear": ("a {a} appears", "a {a} shows up", "a {a} comes into view", "suddenly there is a {a}", "a {a} pops up"),
    "disappear": ("the {a} disappears", "the {a} vanishes", "the {a} is gone", "the {a} goes away",
                  "the {a} disappears from view"),
    "recolor": ("the {a} turns {c}", "the {a} changes color to {c}", "the {a} becomes {c}", "the {a} is now {c}",
                "the {a} switches to {c}"),
    "reshape": ("the {a} turns into a {s}", "the {a} becomes a {s}", "the {a} changes into a {s}",
                "the {a} morphs into a {s}", "the {a} changes shape to a {s}"),
}
MAX_VIDEO_CAPTIONS = min(len(t) for t in _TEMPLATES.values())
_HAPPENED = {"appear": "it appeared", "disappear": "it disappeared", "recolor": "it changed color",
             "reshape": "it changed shape"}
_MIN_MOVE = 0.2  # a move covers at least this fraction of the image side
_APPEAR_RADIUS = {"small": 0.10, "large": 0.15}  # bounding radius of an appearing object (fraction of the side)
_EDGE = 0.02
_GAP = 0.02
_TRIES = 30
_SAME_LOOK = 1  # spawn key of the stream that draws the background and colour jitter of every frame


def _keeps_clear(obj: SceneObject, others: list[SceneObject]) -> bool:
    """Whether ``obj`` lies inside the image with a gap to every one of ``others``."""
    inside = _EDGE + obj.r <= obj.x <= 1 - _EDGE - obj.r and _EDGE + obj.r <= obj.y <= 1 - _EDGE - obj.r
    return inside and all(math.hypot(obj.x - o.x, obj.y - o.y) >= obj.r + o.r + _GAP for o in others)


def _plan_move(rng: np.random.Generator, obj: SceneObject, others: list[SceneObject]) -> tuple[str, SceneObject] | None:
    """A direction and an end place at least ``_MIN_MOVE`` away, clear of the others; None if none fits."""
    for direction in rng.permutation(list(DIRECTIONS)).tolist():
        dx, dy = DIRECTIONS[direction]
        here = obj.x if dx else obj.y
        room = (1 - _EDGE - obj.r - here) if dx + dy > 0 else (here - _EDGE - obj.r)
        if room < _MIN_MOVE:
            continue
        for _ in range(_TRIES):
            step = rng.uniform(_MIN_MOVE, room)
            end = replace(obj, x=obj.x + dx * step, y=obj.y + dy * step)
            if _keeps_clear(end, others):
                return direction, end
    return None


def _plan_appear(rng: np.random.Generator, objects: list[SceneObject]) -> SceneObject | None:
    """A new object, a pair not in the scene, placed clear of the others; None if none fits."""
    taken = {(o.color, o.shape) for o in objects}
    free = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in taken]
    color, shape = pick(rng, free)
    size = pick(rng, list(SIZES))
    r = _APPEAR_RADIUS[size]
    for _ in range(_TRIES):
        obj = SceneObject(color=color, shape=shape, size=size, x=rng.uniform(r + _EDGE, 1 - r - _EDGE),
                          y=rng.uniform(r + _EDGE, 1 - r - _EDGE), r=r)
        if _keeps_clear(obj, objects):
            return obj
    return None


def plan_clip(rng: np.random.Generator, clip_seconds: float, fps: float) -> dict:
    """A scene and its event: ``{"kind", "before", "after", "subject", "start", "end", ...}``.

    ``before`` / ``after`` are the objects at the start and at the end, the event's object last
    in both (so drawing it first or not at all leaves the other objects' colour draws alone);
    ``subject`` is the event's object as it is named (before it changes; as it appears).
    """
    objects = sample_scene(rng, [(c, s) for c in COLORS for s in SHAPES], None, THIRDS_MAX_OBJECTS)
    kinds = [k for k in KINDS if k != "appear" or len(objects) < THIRDS_MAX_OBJECTS]
    frame = 1.0 / fps
    while True:
        kind = pick(rng, kinds)
        subject = pick(rng, objects)
        others = [o for o in objects if o is not subject]
        plan: dict = {"kind": kind}
        if kind == "move":
            move = _plan_move(rng, subject, others)
            if move is None:
                continue
            plan["direction"], after = move
            start = rng.uniform(0.25, 0.35) * clip_seconds
            end = start + rng.uniform(0.3, 0.4) * clip_seconds
        else:
            # An instant event, on a frame boundary between the first and the last quarter of the clip.
            start = round(rng.uniform(0.3, 0.7) * clip_seconds * fps) / fps
            end = start + frame
            if kind == "appear":
                subject = _plan_appear(rng, objects)
                if subject is None:
                    continue
                others, after = objects, subject
            elif kind == "recolor":
                colors = [c for c in COLORS if c != subject.color and (c, subject.shape) not in
                          {(o.color, o.shape) for o in others}]
                after = replace(subject, color=pick(rng, colors))
            elif kind == "reshape":
                shapes = [s for s in SHAPES if s != subject.shape and (subject.color, s) not in
                          {(o.color, o.shape) for o in others}]
                after = replace(subject, shape=pick(rng, shapes))
            else:
                after = None
        plan |= {"subject": subject, "others": others, "after_subject": after, "start": start, "end": end,
                 "before": others + ([] if kind == "appear" else [subject]),
                 "after": others + ([] if after is None else [after])}
        return plan


def objects_at(plan: dict, t: float) -> list[SceneObject]:
    """The objects shown at time ``t``: a move is linear from its start to its end."""
    if t < plan["start"]:
        return plan["before"]
    if plan["kind"] != "move" or t >= plan["end"]:
        return plan["after"]
    a, b = plan["subject"], plan["after_subject"]
    w = (t - plan["start"]) / (plan["end"] - plan["start"])
    return plan["others"] + [replace(a, x=a.x + w * (b.x - a.x), y=a.y + w * (b.y - a.y))]


def clip_captions(plan: dict, k: int) -> list[str]:
    """The first ``k`` paraphrases of the clip's event (they depend only on what happens)."""
    after = plan["after_subject"]
    fields = {"a": plan["subject"].name, "d": _DIRECTION_WORDS.get(plan.get("direction", ""), ""),
              "c": after.color if after else "", "s": after.shape if after else ""}
    return [t.format(**fields) for t in _TEMPLATES[plan["kind"]][:k]]


def clip_questions(rng: np.random.Generator, plan: dict) -> list[tuple[str, str, str, list[str]]]:
    """``(type, question, answer, accepted answers)`` about what happened in the clip."""
    kind, subject, after = plan["kind"], plan["subject"], plan["after_subject"]
    happened = f"it moved {plan['direction']}" if kind == "move" else _HAPPENED[kind]
    out = [("event", f"what happened to the {subject.name}?", happened, [happened])]
    if plan["others"]:
        other = pick(rng, plan["others"])
        out.append(("event", f"what happened to the {other.name}?", "nothing", ["nothing"]))
    if kind == "move":
        d = plan["direction"]
        out.append(("direction", f"which way did the {subject.name} move?", d, [d, _DIRECTION_WORDS[d]]))
    elif kind in ("appear", "disappear"):
        verb = "appeared" if kind == "appear" else "disappeared"
        out.append(("which", f"which object {verb}?", subject.name, [subject.name, f"the {subject.name}"]))
    elif kind == "recolor":
        out.append(("new_color", f"what color did the {subject.name} turn?", after.color, [after.color]))
        out.append(("old_color", f"what color was the {after.name} before?", subject.color, [subject.color]))
    else:
        out.append(("new_shape", f"what shape did the {subject.name} turn into?", after.shape, [after.shape]))
    for when, objects in (("start", plan["before"]), ("end", plan["after"])):
        n = COUNT_WORDS[len(objects)]
        out.append((f"count_{when}", f"how many objects are there at the {when}?", n, [n, str(len(objects))]))
    return out


def _objects(objects: list[SceneObject]) -> list[dict]:
    return [object_record(o) for o in stored(sorted(objects, key=lambda o: o.x))]


def _write_split(split_dir: Path, split_key: int, n: int, *, seed: int, image_size: int, clip_seconds: float,
                 fps: float, captions_per_clip: int, progress: bool) -> set[str]:
    """Write one split folder of ``n`` clips; returns the answers it used."""
    (split_dir / "videos").mkdir(parents=True, exist_ok=True)
    n_frames = round(clip_seconds * fps)
    window = {"start": 0.0, "end": round(n_frames / fps, 6)}
    answers: set[str] = set()
    with (split_dir / "metadata.jsonl").open("w") as meta, (split_dir / "questions.jsonl").open("w") as qs:
        for i in tqdm(range(n), desc=split_dir.name, disable=not progress):
            rng = rng_for(seed, split_key, i)
            plan = plan_clip(rng, clip_seconds, fps)
            name = f"videos/{i:06d}.mp4"
            frames = (np.asarray(draw(rng_for(seed, split_key, i, _SAME_LOOK), objects_at(plan, k / fps), image_size))
                      for k in range(n_frames))
            write_video(split_dir / name, frames, fps)
            captions = clip_captions(plan, captions_per_clip)
            event = {"start": round(plan["start"], 4), "end": round(plan["end"], 4), "text": captions[0],
                     "kind": plan["kind"]}
            record = {"video": name, **window, "captions": captions, "events": [event],
                      "objects": _objects(plan["before"]), "objects_end": _objects(plan["after"])}
            meta.write(json.dumps(record) + "\n")
            for qtype, question, answer, accepted in clip_questions(rng, plan):
                answers.add(answer)
                qs.write(json.dumps({"video": name, **window, "question": question, "answer": answer,
                                     "answers": accepted, "type": qtype}) + "\n")
    return answers


def generate_video_world(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_test: int = 300,
    image_size: int = 128,
    clip_seconds: float = 2.0,
    fps: float = 8.0,
    captions_per_clip: int = MAX_VIDEO_CAPTIONS,
    progress: bool = False,
) -> WorldInfo:
    """Write ``train`` and ``test`` folders of world clips and ``world.json`` under ``out_dir``
    (deterministic for a seed); see the module docstring for the layout."""
    if not 1 <= captions_per_clip <= MAX_VIDEO_CAPTIONS:
        raise ValueError(f"captions per clip must be in 1..{MAX_VIDEO_CAPTIONS}, got {captions_per_clip}")
    if image_size < 16 or image_size % 2:
        raise ValueError(f"image_size of a video must be an even number of at least 16 pixels, got {image_size}")
    if not (fps > 0 and clip_seconds > 0 and round(clip_seconds * fps) >= 8):
        raise ValueError(f"a clip needs at least 8 frames: clip_seconds x fps = {clip_seconds} x {fps}")
    root = Path(out_dir)
    sizes = {"train": n_train, "test": n_test}
    answers: set[str] = set()
    for key, split in enumerate(VIDEO_SPLITS):
        answers |= _write_split(root / split, key, sizes[split], seed=seed, image_size=image_size,
                                clip_seconds=clip_seconds, fps=fps, captions_per_clip=captions_per_clip,
                                progress=progress)
    info = WorldInfo(root=root, splits=sizes, held_out=[], answers=sorted(answers),
                     classes=[f"{c} {s}" for c in COLORS for s in SHAPES])
    world = {"seed": seed, "video": True, "image_size": image_size, "clip_seconds": clip_seconds, "fps": fps,
             "captions_per_clip": captions_per_clip, "kinds": list(KINDS), "colors": list(COLORS),
             "shapes": list(SHAPES), "sizes": list(SIZES), "splits": sizes, "answers": info.answers,
             "classes": info.classes}
    (root / "world.json").write_text(json.dumps(world, indent=2) + "\n")
    return info
