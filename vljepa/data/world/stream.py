"""Long video streams of the built-in world, with timestamped ground-truth captions.

A stream is a sequence of scenes (:func:`~vljepa.data.world.scenes.sample_scene`), each held for a
random duration. Inside a scene the frames are not identical: the whole picture pans slowly (every
object moves by the same small offset, so left/right and above/below never change) and every frame
gets fresh pixel noise. Consecutive scenes always have different captions. Written as::

    <out>/stream.mp4           the video (H.264 via vljepa.data.readers.video.write_video)
    <out>/annotations.json     the scenes and, every ``annotate_every_s`` seconds, the current
                               scene's captions

``annotations.json``: ``{"video", "seed", "fps", "frames", "duration_s", "image_size", "scenes":
[{"start", "end", "captions", "objects"}], "annotations": [{"time", "scene", "captions"}]}``; times
in seconds, a scene spans ``[start, end)``. The stream is deterministic for a seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vljepa.atomic import atomic_folder
from vljepa.data.readers.video import write_video
from vljepa.data.world.captions import MAX_CAPTIONS, captions
from vljepa.data.world.scenes import COLORS, SHAPES, THIRDS_MAX_OBJECTS, Pair, SceneObject, draw, rng_for, sample_scene

VIDEO_FILE = "stream.mp4"
ANNOTATIONS_FILE = "annotations.json"
_PAN = 0.015  # largest offset of the slow pan, as a fraction of the image side (inside the scenes' edge gap)
_NOISE = 3.0  # standard deviation of the per-frame pixel noise (0..255 scale)


@dataclass
class WorldStream:
    """What :func:`generate_stream` wrote."""

    root: Path
    video: Path
    annotations: Path
    duration_s: float
    scenes: list[dict]  # {"start", "end", "captions", "objects"}


def plan_scenes(
    rng: np.random.Generator, duration_s: float, *, min_scene_s: float, max_scene_s: float,
    pairs: Sequence[Pair], max_objects: int, captions_per_scene: int,
) -> list[tuple[float, float, list[SceneObject], list[str]]]:
    """(start, end, objects, captions) of consecutive scenes covering ``[0, duration_s)``; each lasts
    a uniform draw in ``[min_scene_s, max_scene_s]`` (the last one is cut at the end) and differs in
    caption from the one before."""
    scenes: list[tuple[float, float, list[SceneObject], list[str]]] = []
    start = 0.0
    while start < duration_s:
        length = float(rng.uniform(min_scene_s, max_scene_s))
        while True:
            objects = sample_scene(rng, list(pairs), None, max_objects)
            caps = captions(objects, captions_per_scene)
            if not scenes or caps[0] != scenes[-1][3][0]:
                break
        end = min(duration_s, start + length)
        scenes.append((start, end, objects, caps))
        start = end
    return scenes


def _frames(seed: int, scenes: list, fps: float, n_frames: int, image_size: int) -> Iterator[np.ndarray]:
    """The stream's frames ``[H, W, 3]`` uint8, in order."""
    noise_rng = rng_for(seed, 1)
    k = 0
    for i, (start, end, objects, _) in enumerate(scenes):
        # Background and colour jitter are drawn once per scene: the same draw stream for every frame.
        phase = rng_for(seed, 2, i).uniform(0, 2 * math.pi, size=2)
        while k < n_frames and k / fps < end:
            t = k / fps - start
            dx, dy = _PAN * np.sin(2 * math.pi * t / 11.0 + phase)
            moved = [replace(o, x=o.x + dx, y=o.y + dy) for o in objects]
            frame = np.asarray(draw(rng_for(seed, 3, i), moved, image_size), dtype=np.float32)
            frame += noise_rng.normal(0, _NOISE, size=frame.shape)
            yield np.clip(np.rint(frame), 0, 255).astype(np.uint8)
            k += 1


def generate_stream(
    out_dir: str | Path,
    *,
    seed: int = 0,
    duration_s: float = 180.0,
    fps: float = 4.0,
    image_size: int = 128,
    min_scene_s: float = 4.0,
    max_scene_s: float = 30.0,
    annotate_every_s: float = 1.0,
    captions_per_scene: int = 5,
    max_objects: int = THIRDS_MAX_OBJECTS,
    exclude: Sequence[Pair] = (),
) -> WorldStream:
    """Write a world stream folder (layout above) under ``out_dir``, whole or not at all.

    ``exclude``: colour-shape pairs that never appear (e.g. a world's held-out pairs, from its
    ``world.json``). Annotations are at ``annotate_every_s / 2, 3 * annotate_every_s / 2, ...``, so
    they never fall on a whole second where a uniform decoder at 1 Hz would look.
    """
    for name, value in (("duration_s", duration_s), ("fps", fps), ("min_scene_s", min_scene_s),
                        ("annotate_every_s", annotate_every_s)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if max_scene_s < min_scene_s:
        raise ValueError(f"max_scene_s ({max_scene_s}) must be >= min_scene_s ({min_scene_s})")
    if not 1 <= captions_per_scene <= MAX_CAPTIONS:
        raise ValueError(f"captions_per_scene must be in 1..{MAX_CAPTIONS}, got {captions_per_scene}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    excluded = {tuple(p) for p in exclude}
    pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in excluded]
    if len(pairs) < max_objects:
        raise ValueError(f"only {len(pairs)} colour-shape pairs are left after exclude; need at least {max_objects}")
    scenes = plan_scenes(rng_for(seed, 0), duration_s, min_scene_s=min_scene_s, max_scene_s=max_scene_s,
                         pairs=pairs, max_objects=max_objects, captions_per_scene=captions_per_scene)
    n_frames = int(math.ceil(duration_s * fps - 1e-9))
    scene_records = [{"start": round(s, 3), "end": round(e, 3), "captions": caps,
                      "objects": [{"color": o.color, "shape": o.shape, "size": o.size} for o in objects]}
                     for s, e, objects, caps in scenes]
    annotations = []
    t = annotate_every_s / 2
    while t < duration_s:
        i = next(j for j, (s, e, _, _) in enumerate(scenes) if s <= t < e)
        annotations.append({"time": round(t, 3), "scene": i, "captions": scenes[i][3]})
        t += annotate_every_s
    record = {"video": VIDEO_FILE, "seed": seed, "fps": fps, "frames": n_frames, "duration_s": duration_s,
              "image_size": image_size, "scenes": scene_records, "annotations": annotations}
    root = Path(out_dir)
    with atomic_folder(root) as tmp:
        write_video(tmp / VIDEO_FILE, _frames(seed, scenes, fps, n_frames, image_size), fps)
        (tmp / ANNOTATIONS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return WorldStream(root=root, video=root / VIDEO_FILE, annotations=root / ANNOTATIONS_FILE,
                       duration_s=duration_s, scenes=scene_records)
