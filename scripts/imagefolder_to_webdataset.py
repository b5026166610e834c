"""Write a split folder (images + metadata.jsonl / questions.jsonl) as webdataset tar shards.

    python scripts/imagefolder_to_webdataset.py --split data/train --out shards/train --shards 8

Each record becomes one sample: ``KEY.<image extension>`` + ``KEY.json`` holding ``captions``
(caption records) or ``question``, ``answer``, ``answers``, ``type`` (VQA records); VQA records
carry their own copy of the image, as webdataset samples are self-contained. Shards are named
``{prefix}-000000.tar`` ..., readable with ``format: webdataset`` and the pattern
``shards/train/{prefix}-{000000..00000N}.tar``. Records are read by
``vljepa.data.readers.read_split``, so the shards hold exactly what training on the folder reads.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

from vljepa.data.formats import CaptionRecord, DataError
from vljepa.data.readers import read_split


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--split", required=True, help="split folder to convert")
    p.add_argument("--out", required=True, help="folder to write the shards into")
    p.add_argument("--shards", type=int, default=1, help="number of tar shards (default 1)")
    p.add_argument("--task", choices=["caption", "vqa", "both"], default="both",
                   help="which records to write (default both: captions, then questions)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    p.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                   help="bad records: stop, or skip and count (default stop)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.shards < 1:
        print("error: --shards must be at least 1", file=sys.stderr)
        return 2
    split = Path(args.split)
    records: list = []
    errors: list[str] = []
    for task in ["caption", "vqa"] if args.task == "both" else [args.task]:
        try:
            found, report = read_split(split, task, on_error=args.on_error)
        except DataError as exc:
            # With --task both a folder may hold only one kind of record; any other problem is fatal.
            if args.task == "both" and str(exc).startswith(("no usable", "no metadata.jsonl")):
                errors.append(str(exc))
                continue
            print(f"error: {exc}", file=sys.stderr)
            return 1
        records += found
        print(f"{task}: {len(found)} records; {report.summary()}")
    if not records:
        print(f"error: {errors[0]}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(records) // args.shards)
    width = max(6, len(str(args.shards - 1)))
    for s in range(args.shards):
        path = out / f"{args.prefix}-{s:0{width}d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * per_shard, min(len(records), (s + 1) * per_shard)):
                r = records[i]
                key = f"{i:08d}"
                ext = Path(r.image).suffix.lower().lstrip(".") or "png"
                _add(tar, f"{key}.{ext}", Path(r.image).read_bytes())
                if isinstance(r, CaptionRecord):
                    fields = {"captions": list(r.captions)}
                    if r.label is not None:
                        fields["label"] = r.label
                else:
                    fields = {"question": r.question, "answer": r.answer, "answers": list(r.answers), "type": r.type}
                _add(tar, f"{key}.json", json.dumps(fields).encode())
    last = f"{args.shards - 1:0{width}d}"
    print(f"wrote {len(records)} samples in {args.shards} shards: {out}/{args.prefix}-{{{0:0{width}d}..{last}}}.tar")
    return 0


if __name__ == "__main__":
    sys.exit(main())
