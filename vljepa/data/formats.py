"""Record types and the on-disk dataset format.

A split is a folder holding images and one JSON record per line::

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

``file_name`` is relative to the split folder and must stay inside it (no ``..`` out of it, no
absolute path elsewhere, no symlinked folder leading out). Record files are UTF-8. Extra keys
are kept on disk and ignored by the readers. Because captions live in ``metadata.jsonl``, the
folder is also readable by ``datasets.load_dataset("imagefolder", data_dir=<split>)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# How many example locations a SkipReport keeps per reason: enough to find the bad
# records, few enough that a million bad lines do not bloat the report.
_MAX_EXAMPLES = 5


@dataclass(frozen=True)
class CaptionRecord:
    """One image with its captions."""

    image: str  # absolute path of the image file
    captions: tuple[str, ...]
    index: int  # 0-based line number in the source file, for error messages
    label: str | None = None


@dataclass(frozen=True)
class VQARecord:
    """One question about one image."""

    image: str  # absolute path of the image file
    question: str
    answer: str
    answers: tuple[str, ...]  # every accepted answer; contains ``answer``
    type: str  # question type, "" if unknown
    index: int  # 0-based line number in the source file


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
