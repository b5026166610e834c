"""Captioning a video stream: embed frames as they arrive, decode text only where a policy says.

    frames (t, PIL) ──► sliding window of model.config.vision.num_frames frames ──► X + predictor
                    ──► one embedding per step ──► policy (selective.py) ──► decode ──► captions

:func:`embed_stream` turns frames into :class:`StreamStep` embeddings; :func:`caption_stream` adds
the decoding policy and yields both steps and :class:`Caption` events. With the online policy a
caption is decided when its step arrives; Ward and uniform run over the finished stream and yield
their captions at the end. A caption's text is the nearest candidate of a
:class:`~vljepa.decode.nearest.CandidateBank`, or the model's own text decoder where it has one.

Captions are written as JSON, WebVTT and SRT (:func:`save_captions`).
"""

from __future__ import annotations

import json
import math
import time as _time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vljepa.atomic import atomic_folder
from vljepa.data.formats import DataError
from vljepa.data.readers import read_split
from vljepa.data.readers.video import iter_frames, video_info
from vljepa.decode.nearest import CandidateBank
from vljepa.decode.selective import DecodePolicy, Online
from vljepa.embed import autocast, embed_texts, pixel_loader
from vljepa.models.vljepa import VLJepa

TextDecoder = Callable[[torch.Tensor], list[str]]  # embeddings [K, D] -> K texts


@dataclass(frozen=True)
class StreamStep:
    """One embedding of the stream: the model's prediction for the window of frames ending at ``time``."""

    index: int
    time: float  # seconds: timestamp of the window's last frame, when the embedding is available
    start: float  # seconds: timestamp of the window's first frame
    embedding: torch.Tensor  # [D], L2-normalised, float32 on the CPU


@dataclass(frozen=True)
class Caption:
    """A decoded text and the span of the stream it stands for."""

    start: float  # seconds: the text holds from here
    end: float | None  # seconds: until here (None while live: until the next caption)
    text: str
    time: float  # seconds: timestamp of the decoded embedding
    index: int  # the stream step that was decoded


@torch.no_grad()
def embed_stream(
    model: VLJepa,
    frames: Iterable[tuple[float, Image.Image]],
    *,
    stride_s: float | None = None,
    stride_frames: int = 1,
    query: str = "",
    batch_size: int = 1,
    precision: str = "no",
    source: str = "stream",
) -> Iterator[StreamStep]:
    """Predicted embeddings over a sliding window of ``model.config.vision.num_frames`` frames.

    A window ends at every ``stride_frames``-th frame, or (``stride_s`` given) at the first frame at
    least ``stride_s`` seconds after the previous window's end. ``query`` is asked of every window
    ("" = query-free, as in caption pretraining). Windows are run through the model in groups of
    ``batch_size`` (1 = each step as soon as its frame arrives). ``source`` names the stream in errors.

    Raises :class:`DataError` for a stream with no frames, fewer frames than the window, or
    timestamps that do not increase.
    """
    if stride_frames < 1:
        raise ValueError(f"stride_frames must be >= 1, got {stride_frames}")
    if stride_s is not None and not (math.isfinite(stride_s) and stride_s > 0):
        raise ValueError(f"stride_s must be a positive number of seconds, got {stride_s!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    window = model.config.vision.num_frames
    to_tensor = pixel_loader(model)
    q = model.tokenize_queries([query]) if query else None
    device = model.device
    buffer: deque[tuple[float, torch.Tensor]] = deque(maxlen=window)
    pending: list[tuple[float, float, torch.Tensor]] = []  # (start, end, pixels) of windows not yet run
    n_frames, emitted, last_end, last_frame, last_t = 0, 0, -math.inf, -stride_frames, -math.inf

    def run() -> Iterator[StreamStep]:
        nonlocal emitted
        pixels = torch.stack([p for _, _, p in pending]).to(device)
        extra = {} if q is None else {k: v.expand(len(pending), -1).to(device) for k, v in q.items()}
        with autocast(precision, device):
            z = model.predict(pixels, **extra).float().cpu()
        for (start, end, _), row in zip(pending, z):
            yield StreamStep(index=emitted, time=end, start=start, embedding=row)
            emitted += 1
        pending.clear()

    for t, image in frames:
        t = float(t)
        if t <= last_t:
            raise DataError(f"'{source}': frame {n_frames} has timestamp {t:.3f}s, not after the previous "
                            f"one ({last_t:.3f}s); frames must come in time order")
        last_t = t
        buffer.append((t, to_tensor(image.convert("RGB"))))
        n_frames += 1
        if len(buffer) < window:
            continue
        due = (t - last_end >= stride_s - 1e-9) if stride_s is not None else (n_frames - last_frame >= stride_frames)
        if not due:
            continue
        last_end, last_frame = t, n_frames
        clip = torch.stack([p for _, p in buffer]) if window > 1 else buffer[0][1]
        pending.append((buffer[0][0], t, clip))
        if len(pending) >= batch_size:
            yield from run()
    if pending:
        yield from run()
    if n_frames == 0:
        raise DataError(f"'{source}' has no frames; give a video with at least one decodable frame")
    if n_frames < window:
        raise DataError(f"'{source}' has {n_frames} frame(s), fewer than the model's window of {window} frames "
                        "(model.vision.num_frames); give a longer video or sample it at a higher fps")


def bank_decoder(bank: CandidateBank) -> TextDecoder:
    """Decode embeddings as their nearest candidate texts."""
    return lambda z: [texts[0] for texts in bank.decode(z, k=1)]


def model_decoder(model: VLJepa) -> TextDecoder | None:
    """The model's own text decoder (``model.decoder``: ``generate(embeddings) -> list[str]``), or None
    if the model has none."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return None
    return lambda z: decoder.generate(z.to(model.device))


def caption_bank(model: VLJepa, split: str | Path, *, batch_size: int = 256, precision: str = "no") -> CandidateBank:
    """A bank of every caption of a split folder, encoded by the model's Y-encoder + head."""
    records, _ = read_split(split, "caption")
    texts = [c for r in records for c in r.captions]
    return CandidateBank.build(texts, lambda t: embed_texts(model, t, precision=precision), batch_size=batch_size)


def _decode(decode: TextDecoder, embeddings: torch.Tensor) -> list[str]:
    texts = decode(embeddings)
    if len(texts) != len(embeddings) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"the text decoder returned {len(texts)} items for {len(embeddings)} embeddings; "
                         "it must return one string per embedding")
    return texts


def caption_stream(
    steps: Iterable[StreamStep], policy: DecodePolicy, decode: TextDecoder, *, pool: str = "point"
) -> Iterator[StreamStep | Caption]:
    """Yield every step, and a :class:`Caption` for each decode the policy makes.

    :class:`~vljepa.decode.selective.Online` decides at each step (its captions have ``end=None``:
    they hold until the next one); other policies plan over the finished stream and yield all their
    captions after the last step. ``pool="mean"`` decodes the mean embedding of each planned segment
    instead of its decoded row (offline policies only).
    """
    if pool not in ("point", "mean"):
        raise ValueError(f"pool must be 'point' or 'mean', got {pool!r}")
    if isinstance(policy, Online):
        decider = policy.decider()
        for step in steps:
            yield step
            if decider.update(step.time, step.embedding):
                text = _decode(decode, step.embedding[None])[0]
                yield Caption(start=step.time, end=None, text=text, time=step.time, index=step.index)
        return
    seen: list[StreamStep] = []
    for step in steps:
        seen.append(step)
        yield step
    if not seen:
        return
    embeddings = torch.stack([s.embedding for s in seen])
    plan = policy.plan(embeddings, [s.time for s in seen])
    chosen = plan.segment_means(embeddings) if pool == "mean" else embeddings[torch.as_tensor(plan.indices)]
    for k, text in enumerate(_decode(decode, chosen)):
        yield Caption(start=float(plan.starts[k]), end=float(plan.ends[k]), text=text, time=float(plan.times[k]),
                      index=int(plan.indices[k]))


def close_captions(captions: Sequence[Caption], end: float) -> list[Caption]:
    """Captions with every end set: the next caption's start, and ``end`` for the last one."""
    out = []
    for k, c in enumerate(captions):
        stop = captions[k + 1].start if k + 1 < len(captions) else max(end, c.start)
        out.append(replace(c, end=stop))
    return out


def merge_repeats(captions: Sequence[Caption]) -> list[Caption]:
    """Consecutive (closed) captions with the same text merged into one cue spanning them all."""
    out: list[Caption] = []
    for c in captions:
        if out and out[-1].text == c.text:
            out[-1] = replace(out[-1], end=c.end)
        else:
            out.append(c)
    return out


def text_at(captions: Sequence[Caption], times: Sequence[float]) -> list[str]:
    """The text holding at each time: the caption with the latest ``start`` at or before it ("" before
    the first caption)."""
    starts = np.array([c.start for c in captions], dtype=np.float64)
    rows = np.searchsorted(starts, np.asarray(times, dtype=np.float64) + 1e-9, side="right") - 1
    return [captions[r].text if r >= 0 else "" for r in rows.tolist()]


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(max(0.0, seconds) * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue in both formats, so a caption is written on one line.
    return " ".join(text.split())


def _closed(captions: Sequence[Caption]) -> None:
    if any(c.end is None for c in captions):
        raise ValueError("captions without an end; close them first with close_captions(captions, end)")


def to_webvtt(captions: Sequence[Caption]) -> str:
    """WebVTT subtitles: the ``WEBVTT`` header, then one ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` cue per caption."""
    _closed(captions)
    cues = [f"{_timestamp(c.start, '.')} --> {_timestamp(c.end, '.')}\n{_cue_text(c.text)}\n" for c in captions]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_srt(captions: Sequence[Caption]) -> str:
    """SRT subtitles: numbered cues from 1, times as ``HH:MM:SS,mmm``."""
    _closed(captions)
    cues = [f"{k}\n{_timestamp(c.start, ',')} --> {_timestamp(c.end, ',')}\n{_cue_text(c.text)}\n"
            for k, c in enumerate(captions, start=1)]
    return "\n".join(cues)


CAPTIONS_JSON, CAPTIONS_VTT, CAPTIONS_SRT = "captions.json", "captions.vtt", "captions.srt"


def save_captions(out: str | Path, decodes: Sequence[Caption], cues: Sequence[Caption], info: dict) -> Path:
    """Write folder ``out`` (whole or not at all): ``captions.json`` (``info``, every decode and the
    subtitle cues), ``captions.vtt`` and ``captions.srt`` (the cues)."""
    record = {**info, "decodes": [asdict(c) for c in decodes], "captions": [asdict(c) for c in cues]}
    with atomic_folder(out) as tmp:
        (tmp / CAPTIONS_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (tmp / CAPTIONS_VTT).write_text(to_webvtt(cues), encoding="utf-8")
        (tmp / CAPTIONS_SRT).write_text(to_srt(cues), encoding="utf-8")
    return Path(out)


@dataclass
class StreamResult:
    """What :func:`caption_video` produced."""

    times: np.ndarray  # [T] step timestamps (seconds)
    embeddings: torch.Tensor  # [T, D]
    decodes: list[Caption]  # one per decoder call, closed
    cues: list[Caption]  # the decodes with repeated texts merged: the subtitles
    frames: int  # frames read
    seconds: float  # wall time


def caption_video(
    model: VLJepa,
    video: str | Path,
    policy: DecodePolicy,
    decode: TextDecoder,
    *,
    fps: float | None = None,
    frame_rate: float | None = None,
    stride_s: float | None = 0.5,
    query: str = "",
    batch_size: int = 16,
    precision: str = "no",
    pool: str = "point",
    progress: bool = False,
) -> StreamResult:
    """Caption a video file (or a frames folder at ``frame_rate``): frames, resampled to ``fps`` if
    given -> :func:`embed_stream` -> :func:`caption_stream`. The video reader's errors
    (:class:`DataError`) name the file."""
    t0 = _time.time()
    info = video_info(video, frame_rate=frame_rate)
    read = 0

    def frames() -> Iterator[tuple[float, Image.Image]]:
        nonlocal read
        for t, image in iter_frames(video, fps=fps, frame_rate=frame_rate):
            read += 1
            bar.update(1)
            yield t, image

    steps, decodes = [], []
    total = info.num_frames if fps is None else int(math.ceil(info.duration * fps))
    with tqdm(total=total, desc=f"stream {Path(video).name}", unit="frame", disable=not progress) as bar:
        events = caption_stream(embed_stream(model, frames(), stride_s=stride_s, query=query, batch_size=batch_size,
                                             precision=precision, source=str(video)), policy, decode, pool=pool)
        for event in events:
            (steps if isinstance(event, StreamStep) else decodes).append(event)
    closed = close_captions(decodes, info.duration)
    return StreamResult(times=np.array([s.time for s in steps]), embeddings=torch.stack([s.embedding for s in steps]),
                        decodes=closed, cues=merge_repeats(closed), frames=read,
                        seconds=_time.time() - t0)
