"""Convert COCO captions (a captions JSON + its image folder) into a split folder.

    python scripts/coco_to_imagefolder.py --annotations annotations/captions_train2017.json \
        --images train2017 --out data/coco_train

writes ``data/coco_train/images/`` (symlinks to the originals, or copies with --copy) and
``metadata.jsonl`` with one record per image holding all its captions. The JSON is read by
``vljepa.data.readers.read_source`` (format ``coco``), so the conversion accepts and rejects
exactly what training on the JSON directly would.
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
    p.add_argument("--annotations", required=True, help="COCO captions JSON (images + annotations)")
    p.add_argument("--images", required=True, help="folder holding the image files named in the JSON")
    p.add_argument("--out", required=True, help="split folder to write")
    p.add_argument("--copy", action="store_true", help="copy images instead of symlinking them")
    p.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                   help="bad records (missing image, empty caption): stop, or skip and count (default stop)")
    p.add_argument("--max-records", type=int, default=0, help="keep the first N images (0 = all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = SourceConfig(path=args.annotations, format="coco", images=args.images, task="caption",
                          max_records=args.max_records)
    return convert(source, Path(args.out), copy=args.copy, on_error=args.on_error, noun="images")


if __name__ == "__main__":
    sys.exit(main())
