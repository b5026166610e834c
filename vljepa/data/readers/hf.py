"""Hugging Face datasets: ``datasets.load_dataset`` (``hf``) and ``datasets.load_from_disk``
(``hf_disk``); decoded images are written once to regular files."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from PIL import Image

from vljepa.config import SourceConfig
from vljepa.data.formats import DataError
from vljepa.data.readers.common import Problems, inside, no_records, report_escape, vqa_raw
from vljepa.data.readers.materialized import Manifest, manifest_records, materialize, work_folder

_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "image_path", "file_name", "filepath", "path")
_CAPTION_COLUMNS = ("captions", "caption", "text", "sentences")
_ANSWER_COLUMNS = ("multiple_choice_answer", "answer")
_TYPE_COLUMNS = ("answer_type", "type", "question_type")
_DATA_FILES = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


def read_hub_or_files(source: SourceConfig, problem: Problems, *, parsed: object, work_dir: Path | None) -> list:
    """The ``hf`` reader: ``datasets.load_dataset`` of a local folder, a data file or a Hub name."""
    return _read(source, "hf", problem, work_dir)


def read_disk(source: SourceConfig, problem: Problems, *, parsed: object, work_dir: Path | None) -> list:
    """The ``hf_disk`` reader: ``datasets.load_from_disk`` of a folder written by ``save_to_disk``."""
    return _read(source, "hf_disk", problem, work_dir)


def _read(source: SourceConfig, fmt: str, problem: Problems, work_dir: Path | None) -> list:
    """Rows of a Hugging Face dataset; images are written once to ``work_dir/hf/<key>/images/``."""
    import datasets

    if source.streaming and source.max_records <= 0:
        raise DataError(
            f"streaming source '{source.path}' needs max_records > 0 (how many rows to read); set max_records")
    ds = _open(source, fmt)
    cols = _columns(ds)
    if isinstance((ds.features or {}).get(cols["image"]), datasets.Image):
        ds = ds.cast_column(cols["image"], datasets.Image(decode=False))  # decode here, one bad row at a time
    if source.max_records > 0:
        ds = ds.take(source.max_records) if source.streaming else ds.select(range(min(source.max_records, len(ds))))
    path = Path(source.path).expanduser()
    base = (path if path.is_dir() else path.parent).resolve() if path.exists() else None

    def build(folder: Path) -> None:
        """Write every row's image and raw record into ``folder``."""
        with Manifest(folder) as manifest:
            for i, row in enumerate(ds):
                where = f"{source.path}[{source.split}]:{i}"
                image = _image(row[cols["image"]], folder, base, manifest, where)
                if image is not None:
                    manifest.sample(where, image, _row_raw(row, cols))

    folder = materialize(work_folder(work_dir, source, "hf", _identity(source, fmt, ds)), build)
    tally = {"samples": 0, "other": 0}
    records = manifest_records(folder, source.task, problem, tally)
    if not records:
        raise no_records(source.task, f"'{source.path}'", tally["other"], problem.report)
    return records


def _local_hint(name: str) -> str:
    """How to read Hub dataset ``name`` without the network."""
    return (
        f"to read '{name}' offline, save it once where the Hub is reachable with "
        f"datasets.load_dataset('{name}').save_to_disk(DIR) and set path: DIR, format: hf_disk "
        "(or point path at local data files with format: hf)"
    )


def _open(source: SourceConfig, fmt: str):
    """The rows of an hf / hf_disk source: a ``datasets.Dataset`` or (streaming) ``IterableDataset``."""
    import datasets

    path = Path(source.path).expanduser()
    local = path.exists()
    try:
        if fmt == "hf_disk":
            if not local:
                raise DataError(f"hf_disk source '{source.path}' does not exist; expected a folder written by save_to_disk")
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if source.split not in ds:
                    raise DataError(
                        f"'{source.path}' has no split '{source.split}'; set split to one of {sorted(ds)}")
                ds = ds[source.split]
            return ds.to_iterable_dataset() if source.streaming else ds
        if local and path.is_file():
            builder = _DATA_FILES.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"cannot read '{source.path}' with datasets: use a {', '.join(_DATA_FILES)} file or a folder")
            return datasets.load_dataset(builder, data_files={source.split: str(path)}, split=source.split,
                                         streaming=source.streaming)
        return datasets.load_dataset(str(path) if local else source.path, split=source.split,
                                     streaming=source.streaming)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many kinds (connection, not found, bad split): name the source
        reason = f"{type(exc).__name__}: {exc}"
        if local:
            raise DataError(f"cannot load Hugging Face dataset '{source.path}' (split '{source.split}'): {reason}") from exc
        raise DataError(
            f"cannot load Hugging Face dataset '{source.path}' (split '{source.split}'): {reason}; it is not a "
            f"local path, so it was looked up on the Hub; {_local_hint(source.path)}"
        ) from exc


def _columns(ds) -> dict[str, object]:
    """Which columns hold the image, captions, question, answer(s) and type; error if none fit."""
    import datasets

    names = list(ds.column_names or [])
    if not names:  # a stream without declared features: look at the first row
        names = list(next(iter(ds), {}))
    features = ds.features or {}
    image = next((n for n in names if isinstance(features.get(n), datasets.Image)), None)
    image = image or next((n for n in _IMAGE_COLUMNS if n in names), None)
    cols = {
        "image": image,
        "captions": [n for n in _CAPTION_COLUMNS if n in names],
        "question": "question" if "question" in names else None,
        "answer": next((n for n in _ANSWER_COLUMNS if n in names), None),
        "answers": "answers" if "answers" in names else None,
        "type": next((n for n in _TYPE_COLUMNS if n in names), None),
    }
    if image is None or not (cols["captions"] or cols["question"]):
        raise DataError(
            f"cannot find the columns to read (columns: {names}): need an image column (an Image feature or one "
            f"of {list(_IMAGE_COLUMNS)}) and caption ({list(_CAPTION_COLUMNS)}) or question + answer columns"
        )
    return cols


def _caption_texts(value: object) -> object:
    """Captions as a list of strings; ``sentences`` may be ``[{"raw": ...}]`` (Karpathy splits)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and isinstance(value.get("raw"), list):
        value = value["raw"]
    if isinstance(value, list):
        return [v.get("raw", v.get("text")) if isinstance(v, dict) else v for v in value]
    return value


def _row_raw(row: dict, cols: dict) -> dict:
    """One row as a raw record: captions from every caption column, or question and answers."""
    raw: dict = {}
    if cols["captions"]:
        texts: list = []
        for name in cols["captions"]:
            value = _caption_texts(row[name])
            if not isinstance(value, list):
                raw["captions"] = value  # malformed: caption_record reports it
                break
            texts += value
        else:
            raw["captions"] = list(dict.fromkeys(texts)) if all(isinstance(t, str) for t in texts) else texts
    if cols["question"]:
        raw.update(vqa_raw(row[cols["question"]], row[cols["answer"]] if cols["answer"] else None,
                           row[cols["answers"]] if cols["answers"] else None,
                           row[cols["type"]] if cols["type"] else ""))
    return raw


def _image(value: object, folder: Path, base: Path | None, manifest: Manifest, where: str) -> str | None:
    """One row's image as a file, or None after recording why not.

    A decoded image is written as ``images/<hash of its bytes>.png`` (rows with the same image share
    a file). A path (a path column, or an Image feature without bytes) names an existing file: a
    relative one must lie inside the dataset's folder; an absolute one is where ``datasets`` keeps it.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, str):
        data, path = None, value
    elif isinstance(value, Image.Image):
        data, path = None, None
    else:
        manifest.problem("missing image", where, f" (image column holds {type(value).__name__})")
        return None
    if data is None and path is not None:
        p = Path(path).expanduser()
        if not p.is_absolute() and base is not None:
            p = inside(base, path)
            if p is None:
                report_escape(manifest.problem, where, path, "dataset folder", base)
                return None
        if not p.is_file():
            manifest.problem("image not found", where, f" ('{path}')")
            return None
        return str(p.resolve())
    try:
        if isinstance(value, Image.Image):
            img = value.convert("RGB")
            name = hashlib.sha256(f"{img.size}".encode() + img.tobytes()).hexdigest()[:20]
        else:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                img, name = opened.convert("RGB"), hashlib.sha256(data).hexdigest()[:20]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        manifest.problem("unreadable image", where, f" ({exc})")
        return None
    target = folder / "images" / f"{name}.png"
    if not target.is_file():
        target.parent.mkdir(exist_ok=True)
        img.save(target, format="PNG")
    return f"images/{name}.png"


def _identity(source: SourceConfig, fmt: str, ds) -> str:
    """What the materialized folder depends on: the source, its rows, and (local) its files."""
    path = Path(source.path).expanduser()
    files = []
    if path.exists():
        for f in sorted([path] if path.is_file() else path.rglob("*")):
            if f.is_file():
                st = f.stat()
                files.append([str(f.relative_to(path) if f != path else f.name), st.st_size, st.st_mtime_ns])
    return json.dumps({
        "format": fmt, "path": str(path.resolve()) if path.exists() else source.path, "split": source.split,
        "rows": source.max_records, "fingerprint": getattr(ds, "_fingerprint", None), "files": files,
    }, sort_keys=True)
