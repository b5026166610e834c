"""webdataset tar shards: ``KEY.jpg|jpeg|png|webp`` + ``KEY.txt`` (caption) or ``KEY.json``
(``caption``/``captions`` or ``question``/``answer``/``answers``/``type``), unpacked once."""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import zlib
from pathlib import Path

from vljepa.config import SourceConfig
from vljepa.data.formats import DataError
from vljepa.data.readers.common import Problems, bad_byte, inside, no_records, report_escape, vqa_raw
from vljepa.data.readers.materialized import Manifest, file_identity, manifest_records, materialize, work_folder

GLOB_CHARS = "*?[{"
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)
_NOT_UTF8_FIX = "re-write the member as UTF-8, or set data.on_error=skip to skip such samples"


def is_tar(path: Path) -> bool:
    """Whether ``path`` is a file named like a tar shard."""
    return path.is_file() and path.name.lower().endswith(_TAR_SUFFIXES)


def expand_pattern(pattern: str) -> list[Path]:
    """Brace ranges and lists (``{000..009}``, ``{a,b}``, as webdataset writes them), then glob."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match:
        body, out = match.group(1), []
        numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if numeric:
            lo, hi = numeric.groups()
            options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            options = body.split(",")
        for option in options:
            out += expand_pattern(pattern[: match.start()] + option + pattern[match.end():])
        return out
    if any(c in pattern for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern)))]
    return [Path(pattern).expanduser()]


def read(source: SourceConfig, problem: Problems, *, parsed: object, work_dir: Path | None) -> list:
    """The ``webdataset`` reader: samples of every shard, each shard unpacked once to
    ``work_dir/webdataset/<key>/`` (key: the shard's path, size and modification time)."""
    records: list = []
    tally = {"samples": 0, "other": 0}
    for shard in _shards(source.path):
        dest = work_folder(work_dir, source, "webdataset", file_identity(shard))
        folder = materialize(dest, lambda tmp, shard=shard: _extract_shard(shard, tmp))
        records += manifest_records(folder, source.task, problem, tally)
    if not records:
        raise no_records(source.task, f"'{source.path}'", tally["other"], problem.report)
    return records


def _shards(path: str) -> list[Path]:
    """The shard files of a webdataset source: one file, a folder of them, or a pattern."""
    p = Path(path).expanduser()
    if p.is_dir():
        shards = sorted(c for c in p.iterdir() if is_tar(c))
    elif p.is_file():
        shards = [p]
    else:
        shards = expand_pattern(path) if any(c in path for c in GLOB_CHARS) else []
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise DataError(f"webdataset shard '{missing[0]}' of '{path}' does not exist")
    if not shards:
        raise DataError(
            f"no tar shards at '{path}'; a webdataset source is a .tar file, a folder of .tar files or a "
            "pattern such as 'shards/{000000..000009}.tar'"
        )
    return shards


def _member_key(name: str) -> tuple[str, str] | None:
    """``dir/000123.seg.png`` -> (``dir/000123``, ``seg.png``): the key ends at the first dot of the
    file name, as webdataset groups files into samples; None for names without an extension."""
    match = re.fullmatch(r"((?:.*/)?[^./][^./]*)\.([^/]+)", name)
    return (match.group(1), match.group(2).lower()) if match else None


def _extract_shard(shard: Path, folder: Path) -> None:
    """Unpack a shard's images to ``folder/files/`` and write its manifest (captions from ``.txt``,
    fields from ``.json``); unreadable members are recorded as problems, not raised."""
    samples: dict[str, dict] = {}  # key -> {"image", "raw", "broken"}, in shard order
    with Manifest(folder) as manifest:
        try:
            _unpack_members(shard, folder, manifest, samples)
        except (PermissionError, FileNotFoundError):
            raise  # a problem of access, not of content: not recorded in the reused folder
        except _TAR_ERRORS as exc:
            manifest.problem("unreadable tar shard", str(shard), f" ({exc})")
        for key, sample in samples.items():
            if not sample["broken"]:
                manifest.sample(f"{shard}:{key}", sample["image"], sample["raw"])


def _unpack_members(shard: Path, folder: Path, manifest: Manifest, samples: dict[str, dict]) -> None:
    """Group the shard's members into ``samples`` by key, writing image members under ``folder``."""
    files = Path(os.path.abspath(folder / "files"))
    with tarfile.open(shard, "r:*") as tar:
        while True:
            offset = tar.offset
            try:
                member = tar.next()
            except _TAR_ERRORS as exc:
                manifest.problem("unreadable tar member", f"{shard}@{offset}", f" ({exc})")
                break
            if member is None:
                if _trailing_garbage(shard, offset):
                    manifest.problem("unreadable tar member", f"{shard}@{offset}",
                                     " (data after the last readable member: truncated or corrupt)")
                break
            keyed = _member_key(member.name) if member.isfile() else None
            if keyed is None:
                continue
            key, ext = keyed
            where = f"{shard}:{member.name}"
            sample = samples.setdefault(key, {"image": None, "raw": {}, "broken": False})
            is_image = ext in _IMAGE_EXTENSIONS
            if not (is_image or ext in ("txt", "json")) or (is_image and sample["image"]):
                continue
            target = inside(files, member.name) if is_image else None
            if is_image and target is None:
                report_escape(manifest.problem, where, member.name, "shard", shard)
                sample["broken"] = True
                continue
            try:
                data = tar.extractfile(member).read()
            except _TAR_ERRORS as exc:
                # The data ends early (or, compressed, is corrupt): nothing after it can be read.
                manifest.problem("unreadable tar member", where, f" ({exc})")
                sample["broken"] = True
                break
            if is_image:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                sample["image"] = f"files/{target.relative_to(files).as_posix()}"
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                manifest.problem("tar member is not UTF-8", where, f" ({bad_byte(data, exc)})", _NOT_UTF8_FIX)
                sample["broken"] = True
                continue
            if ext == "txt":
                sample["raw"].setdefault("caption", text)
            else:
                _merge_sample_json(text, sample, manifest, where)


def _merge_sample_json(text: str, sample: dict, manifest: Manifest, where: str) -> None:
    """Add a ``.json`` member's fields to its sample, or mark the sample broken."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        manifest.problem("invalid JSON", where, f" ({exc})")
        sample["broken"] = True
        return
    if not isinstance(fields, dict):
        manifest.problem("record is not a JSON object", where)
        sample["broken"] = True
        return
    if "question" in fields:
        fields.update(vqa_raw(fields["question"], fields.get("answer"), fields.get("answers"), fields.get("type", "")))
    sample["raw"].update(fields)


def _trailing_garbage(shard: Path, offset: int) -> bool:
    """Whether an uncompressed tar holds non-zero bytes past where tarfile stopped reading: tarfile
    ends quietly at a truncated or corrupt header, which would otherwise drop samples unseen."""
    if not shard.name.lower().endswith(".tar"):
        return False
    with shard.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            if chunk.strip(b"\0"):
                return True
    return False
