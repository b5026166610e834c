"""The built-in procedural world: seeded 2-D scenes with captions and questions.

Each image holds one to three filled shapes (up to six with ``max_objects``), each with a colour,
a shape and a size, placed so that left-to-right order is never ambiguous
(:mod:`~vljepa.data.world.scenes`). Captions (:mod:`~vljepa.data.world.captions`) and questions
(:mod:`~vljepa.data.world.questions`, and with ``grounded`` the families of
:mod:`~vljepa.data.world.grounded`) are derived from the scene, so every answer is checkable
from the ``objects`` stored with each image.

The world is written in the on-disk split format (:mod:`vljepa.data.formats`) and is read
back through the same readers as user data::

    <out>/world.json
    <out>/{train,test,comp}/images/000000.png
    <out>/{train,test,comp}/metadata.jsonl     captions + objects (+ label for one object)
    <out>/{train,test,comp}/questions.jsonl    VQA records (grounded ones also carry a family)

Compositional generalisation: four colour-shape pairs (no two sharing a colour or a shape)
never appear in ``train`` or ``test``; every ``comp`` image contains at least one of them.

Every random draw for image ``i`` of a split comes from its own stream, seeded by
``(seed, split, i)``, so a split does not change when the size of another one does.

Video (:mod:`~vljepa.data.world.video`, ``vljepa world --video``): ``train`` and ``test`` folders
of short clips in which one object moves, appears, disappears or changes colour or shape, with
captions, timestamped events and questions about what happened.
"""

from vljepa.data.world.captions import MAX_CAPTIONS
from vljepa.data.world.scenes import COLORS, MAX_OBJECTS, SHAPES, SIZE_WORDS, SIZES
from vljepa.data.world.video import MAX_VIDEO_CAPTIONS, generate_video_world
from vljepa.data.world.write import WorldInfo, generate_world

__all__ = ["COLORS", "MAX_CAPTIONS", "MAX_OBJECTS", "MAX_VIDEO_CAPTIONS", "SHAPES", "SIZES", "SIZE_WORDS", "WorldInfo",
           "generate_video_world", "generate_world"]
