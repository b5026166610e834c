"""Record types and the on-disk dataset format.

A split is a folder holding images (or videos) and one JSON record per line::

    <split>/
      images/000123.png
      metadata.jsonl        caption records (and/or VQA records)
      questions.jsonl       optional: VQA records sharing the same images

Caption record (one image, one or more captions; ``label`` is an optional class name used
by zero-shot classification)::

    {"file_name": "images/000123.png", "captions": ["a red circle", "one red circle"], "label": "red circle"}

``"caption": "..."`` or ``"text": "..."`` may stand in for ``"captions"``.

VQA record (``answers`` defaults to ``[answer]``; ``type`` is optional)::

    {"file_name": "images/000123.png", "question": "what color is the circle?",
     "answer": "red", "answers": ["red"], "type": "color"}

Video records give a clip instead of ``file_name``, in any of three forms, each with an optional
window ``start`` / ``end`` in seconds (default: the whole video) and the same ``captions`` or
``question`` / ``answer`` keys::

    {"video": "clips/00012.mp4", "start": 1.5, "end": 4.0, "captions": ["the red circle moves to the left"]}
    {"video": "frames/00012", "fps": 10, "question": "what happened to the red circle?", "answer": "it disappeared"}
    {"frames": ["f/0001.png", "f/0002.png"], "timestamps": [0.0, 0.5], "captions": ["..."]}

``video`` is a video file (``.mp4``, ``.webm``, ... read with PyAV; a ``file_name`` with a video suffix
is read the same way) or a folder of frame images sorted by name, shown ``fps`` frames a second.
``frames`` lists frame files with their ``timestamps`` (increasing seconds) or an ``fps``; a string
``frames`` names a frames folder. A vision encoder of ``T`` frames reads ``T`` frames spread evenly
over the window (:func:`vljepa.data.readers.video.read_clip`). Other keys, such as the built-in
world's timestamped ``events`` (``[{"start": s, "end": s, "text": ...}]``), are kept on disk.

``file_name`` (and every video or frame path) is relative to the split folder and must stay inside
it (no ``..`` out of it, no absolute path elsewhere, no symlinked folder leading out). Record files
are UTF-8. Extra keys are kept on disk and ignored by the readers. Because captions live in
``metadata.jsonl``, a folder of image records is also readable by
``datasets.load_dataset("imagefolder", data_dir=<split>)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# How many example locations a SkipReport keeps per reason: enough to find the bad
# records, few enough that a million bad lines do not bloat the report.
_MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Clip:
    """A stretch of video: a video file, a folder of frames or a list of frame files, in ``[start, end)``.

    A record's ``image`` is a string every consumer passes on unchanged (as a table key, a cache
    item, a path in a skip report); for a clip it is :meth:`ref`, a canonical JSON object, which
    :meth:`parse` turns back into the clip. Image paths are absolute, so they never start with ``{``.
    """

    video: str = ""  # absolute path of a video file or a frames folder; "" for a frame list
    frames: tuple[str, ...] = ()  # absolute paths of the frame files of a frame list
    timestamps: tuple[float, ...] = ()  # seconds of each frame of a frame list (else frames are 1 / fps apart)
    fps: float | None = None  # frame rate of a frames folder or of a frame list without timestamps
    start: float = 0.0  # seconds
    end: float | None = None  # seconds; None = the end of the video

    def ref(self) -> str:
        """The canonical string of this clip (equal clips give equal strings)."""
        fields = {"video": self.video, "frames": list(self.frames), "timestamps": [float(t) for t in self.timestamps],
                  "fps": _float(self.fps), "start": float(self.start), "end": _float(self.end)}
        return json.dumps({k: v for k, v in fields.items() if v not in ("", [], None)}, sort_keys=True)

    @classmethod
    def parse(cls, item: str) -> Clip | None:
        """The clip whose :meth:`ref` is ``item``, or None when ``item`` is an image path."""
        if not item.startswith("{"):
            return None
        raw = json.loads(item)
        return cls(video=raw.get("video", ""), frames=tuple(raw.get("frames", ())),
                   timestamps=tuple(raw.get("timestamps", ())), fps=raw.get("fps"),
                   start=raw.get("start", 0.0), end=raw.get("end"))

    @property
    def files(self) -> tuple[str, ...]:
        """The files this clip reads from: the video file or folder, or the frame files."""
        return (self.video,) if self.video else self.frames

    @property
    def name(self) -> str:
        """How messages name the clip: its file or folder, or its first frame file."""
        return self.video or (f"{self.frames[0]} (frame list of {len(self.frames)})" if self.frames else "empty clip")


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class CaptionRecord:
    """One image (or clip) with its captions."""

    image: str  # absolute path of the image file, or a clip's Clip.ref()
    captions: tuple[str, ...]
    index: int  # 0-based line number in the source file, for error messages
    label: str | None = None
    clip: Clip | None = None  # the clip, for a video record


@dataclass(frozen=True)
class VQARecord:
    """One question about one image (or clip)."""

    image: str  # absolute path of the image file, or a clip's Clip.ref()
    question: str
    answer: str
    answers: tuple[str, ...]  # every accepted answer; contains ``answer``
    type: str  # question type, "" if unknown
    index: int  # 0-based line number in the source file
    clip: Clip | None = None  # the clip, for a video record


class DataError(ValueError):
    """A dataset problem; the message names the file, line or image and the fix."""


@dataclass
class SkipReport:
    """Counts of records skipped while reading, by reason, with a few example locations."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        """Count one skipped record (or caption) for ``reason``, found at ``where``."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < _MAX_EXAMPLES:
            kept.append(where)

    def merge(self, other: SkipReport) -> None:
        """Add another report's counts and examples to this one."""
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            kept = self.examples.setdefault(reason, [])
            kept.extend(other.examples.get(reason, [])[: _MAX_EXAMPLES - len(kept)])

    @property
    def total(self) -> int:
        """Number of skips over all reasons."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line per reason, e.g. ``skipped 3: image not found x2 (a.jsonl:4, ...)``."""
        if not self.counts:
            return "skipped 0"
        lines = [f"skipped {self.total}:"]
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            where = ", ".join(self.examples[reason])
            more = ", ..." if n > len(self.examples[reason]) else ""
            lines.append(f"  {reason} x{n} ({where}{more})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form: ``{"total": n, "counts": {...}, "examples": {...}}``."""
        return {
            "total": self.total,
            "counts": dict(self.counts),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }
