"""Writing the built-in world as split folders (layout in :mod:`vljepa.data.world`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vljepa.data.world.captions import MAX_CAPTIONS, captions
from vljepa.data.world.grounded import grounded_questions
from vljepa.data.world.questions import questions
from vljepa.data.world.scenes import (
    COLORS,
    MAX_OBJECTS,
    SHAPES,
    SIZES,
    THIRDS_MAX_OBJECTS,
    Pair,
    choose_held_out,
    draw,
    object_record,
    rng_for,
    sample_scene,
    stored,
)

_SPLITS = ("train", "test", "comp")
_HELD_OUT_STREAM = len(_SPLITS)  # spawn key of the stream that picks held-out pairs


@dataclass
class WorldInfo:
    """What :func:`generate_world` wrote."""

    root: Path
    splits: dict[str, int]  # split name -> number of images
    held_out: list[tuple[str, str]]  # (colour, shape) pairs absent from train and test
    answers: list[str]  # sorted answer vocabulary over all splits
    classes: list[str]  # every "colour shape" string


def _write_split(
    split_dir: Path,
    split_key: int,
    n: int,
    *,
    seed: int,
    pairs: list[Pair],
    held_out: list[Pair] | None,
    forbidden: set[Pair],
    image_size: int,
    captions_per_image: int,
    grounded: bool,
    max_objects: int,
    progress: bool,
) -> set[str]:
    """Write one split folder; returns the answers it used."""
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    answers: set[str] = set()
    with (split_dir / "metadata.jsonl").open("w") as meta, (split_dir / "questions.jsonl").open("w") as qs:
        for i in tqdm(range(n), desc=split_dir.name, disable=not progress):
            rng = rng_for(seed, split_key, i)
            objects = sample_scene(rng, pairs, held_out, max_objects)
            file_name = f"images/{i:06d}.png"
            draw(rng, objects, image_size).save(split_dir / file_name)
            kept = stored(objects)
            record = {
                "file_name": file_name,
                "captions": captions(objects, captions_per_image),
                "objects": [object_record(o) for o in kept],
            }
            if len(objects) == 1:
                record["label"] = objects[0].name
            meta.write(json.dumps(record) + "\n")
            classic = questions(rng, objects, forbidden)
            rows = [(qtype, None, question, answer, accepted) for qtype, question, answer, accepted in classic]
            if grounded:
                rows += grounded_questions(rng, kept, {question for _, question, _, _ in classic})
            for qtype, family, question, answer, accepted in rows:
                answers.add(answer)
                line = {"file_name": file_name, "question": question, "answer": answer, "answers": accepted,
                        "type": qtype}
                if family is not None:
                    line["family"] = family
                qs.write(json.dumps(line) + "\n")
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
    grounded: bool = False,
    max_objects: int = THIRDS_MAX_OBJECTS,
    progress: bool = False,
) -> WorldInfo:
    """Generate the built-in world under ``out_dir`` (deterministic for a seed).

    Writes ``train``, ``test`` and ``comp`` split folders and ``world.json``; see the
    package docstring for the layout. ``captions_per_image`` is at most ``MAX_CAPTIONS``
    (each caption of an image comes from a different template). ``grounded`` adds the grounded
    question families (:mod:`vljepa.data.world.grounded`) to each image's questions; scenes hold
    1 to ``max_objects`` objects (1..6; above 3 they are smaller and placed anywhere).
    """
    if not 1 <= captions_per_image <= MAX_CAPTIONS:
        raise ValueError(f"captions_per_image must be in 1..{MAX_CAPTIONS}, got {captions_per_image}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    root = Path(out_dir)
    held_out = choose_held_out(rng_for(seed, _HELD_OUT_STREAM))
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
            grounded=grounded,
            max_objects=max_objects,
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
    # Written only when not the defaults, so that a default world's world.json keeps its keys.
    if grounded or max_objects != THIRDS_MAX_OBJECTS:
        world |= {"grounded": grounded, "max_objects": max_objects}
    (root / "world.json").write_text(json.dumps(world, indent=2) + "\n")
    return info
