"""Convert VQAv2 or GQA questions (JSON + image folder) into a split folder with questions.jsonl.

    python scripts/vqa_to_imagefolder.py --questions v2_OpenEnded_mscoco_val2014_questions.json \
        --images val2014 --out data/vqa_val
    python scripts/vqa_to_imagefolder.py --questions val_balanced_questions.json --images gqa/images \
        --out data/gqa_val

VQAv2: the annotations are found beside the questions file (v2_mscoco_val2014_annotations.json,
or the questions name with "questions" -> "annotations", or annotations.json); images are
COCO_<subtype>_<id:012d>.jpg, <id:012d>.jpg, <id>.jpg or <id>.png. GQA: images <imageId>.jpg.
Each record keeps the majority answer, every distinct human answer, and the answer type. The
JSON is read by ``vljepa.data.readers.read_source`` (format ``vqa``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _split_writer import convert  # noqa: E402

from vljepa.config import SourceConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--questions", required=True, help="VQAv2 questions JSON or GQA questions JSON")
    p.add_argument("--images", required=True, help="folder holding the image files")
    p.add_argument("--out", required=True, help="split folder to write")
    p.add_argument("--copy", action="store_true", help="copy images instead of symlinking them")
    p.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                   help="bad records (missing image or annotation): stop, or skip and count (default stop)")
    p.add_argument("--max-records", type=int, default=0, help="keep the first N questions (0 = all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = SourceConfig(path=args.questions, format="vqa", images=args.images, task="vqa",
                          max_records=args.max_records)
    return convert(source, Path(args.out), copy=args.copy, on_error=args.on_error, noun="questions")


if __name__ == "__main__":
    sys.exit(main())
