"""Video in and out: video files through PyAV, folders of frames and lists of frame files.

Every source of frames goes through the same functions: :func:`video_info`, :func:`iter_frames`
and :func:`read_clip` take a video file or a folder of image files (sorted by name, ``frame_rate``
frames a second); :func:`read_frame_list` reads frame files listed with their timestamps.
Times are seconds of presentation time from the first frame of the stream. A window
``[start, end)`` keeps the frames whose time falls in it; a frame rate ``fps`` resamples the
stream to the times ``start, start + 1/fps, ...``, each showing the latest frame at or before it.

:func:`load_visual` is the one function that turns a record's ``image`` (an image path or a
:class:`~vljepa.data.formats.Clip` reference) into the frames a vision encoder reads.
:func:`write_video` writes frames to an H.264 ``.mp4`` or a VP9 ``.webm``, atomically.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from vljepa.data.formats import Clip, DataError
from vljepa.data.readers.common import FIX, OnError, check_on_error, load_image

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Suffix -> (container format, encoder, encoder options). x264 at CRF 18 and VP9 at CRF 24 are close
# to visually lossless; one encoder thread makes the bytes depend on the frames alone.
_ENCODERS = {
    ".mp4": ("mp4", "libx264", {"crf": "18", "preset": "medium"}),
    ".webm": ("webm", "libvpx-vp9", {"crf": "24", "b": "0", "deadline": "good", "cpu-used": "4"}),
}
_WINDOW_FIX = "give 0 <= start < end <= the duration"
# Colour conversion (swscale) in one thread: with several, the rows after a slice boundary have
# come out different from run to run, so neither written files nor decoded pixels would repeat.
_SWS_THREADS = 1


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds: ``duration`` in seconds, frame rate, frame count and frame size."""

    duration: float
    fps: float
    num_frames: int
    width: int
    height: int


# A decoded frame as a callable: the RGB image is made only when a caller wants it.
LazyImage = Callable[[], Image.Image]


class _Source:
    """The frames of one input: their times, and a way to decode them from a time on."""

    name: str  # how messages name the input
    times: list[float]  # presentation time of every frame, increasing
    frame_duration: float  # how long the last frame is shown
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.times[-1] + self.frame_duration

    def info(self) -> VideoInfo:
        return VideoInfo(duration=self.duration, fps=1.0 / self.frame_duration if self.frame_duration else 0.0,
                         num_frames=len(self.times), width=self.width, height=self.height)

    def decode(self, start: float) -> Iterator[tuple[float, LazyImage]]:
        """``(time, image)`` of each frame in time order, from the latest frame at or before ``start``."""
        raise NotImplementedError


class _VideoFile(_Source):
    """A video file read with PyAV; frame times come from the demuxed packets (no decoding)."""

    def __init__(self, path: Path) -> None:
        self.path, self.name = path, str(path)
        with self._open() as container:
            stream = container.streams.video[0]
            self.width, self.height = stream.codec_context.width, stream.codec_context.height
            self.time_base = stream.time_base
            self.origin = stream.start_time or 0
            try:
                pts = sorted(p.pts for p in container.demux(stream) if p.size and p.pts is not None)
            except (av.FFmpegError, OSError) as exc:
                raise DataError(f"cannot read video '{path}' ({_reason(exc)}): the file is corrupt or "
                                f"truncated; re-encode or replace it") from exc
            rate = stream.average_rate or stream.guessed_rate
        if not pts:
            raise DataError(f"video '{path}' has no decodable frames; re-encode or replace it")
        self.times = [self._seconds(p) for p in pts]
        gaps = np.diff(self.times)
        self.frame_duration = float(np.median(gaps)) if len(gaps) else (1.0 / float(rate) if rate else 1.0)

    def _seconds(self, pts: int) -> float:
        return float((pts - self.origin) * self.time_base)

    def _open(self):
        if not self.path.is_file():
            raise DataError(f"video '{self.path}' does not exist; check the path")
        try:
            container = av.open(str(self.path))
        except (av.FFmpegError, OSError) as exc:
            raise DataError(f"cannot open video '{self.path}' ({_reason(exc)}): not a video file, or a corrupt or "
                            "truncated one; re-encode or replace it") from exc
        fmt = container.format.name
        if fmt == "image2" or fmt.endswith("_pipe"):
            container.close()
            raise DataError(f"'{self.path}' is an image, not a video; give images as file_name, or a folder "
                            "of frames as a video with an fps")
        if not container.streams.video:
            container.close()
            raise DataError(f"'{self.path}' has no video stream; give a video file")
        return container

    def decode(self, start: float) -> Iterator[tuple[float, LazyImage]]:
        frames = self._decode_from(start) if start > 0 else None
        first = next(frames, None) if frames is not None else None
        # A seek lands on the keyframe at or before start; where it lands after a frame that is
        # at or before start (a badly indexed file), decode from the beginning instead.
        if first is None or (first[0] > start and self.times[0] <= start):
            if frames is not None:
                frames.close()
            frames, first = self._decode_from(0.0), None
        if first is not None:
            yield first
        yield from frames

    def _decode_from(self, start: float) -> Iterator[tuple[float, LazyImage]]:
        container = self._open()
        try:
            stream = container.streams.video[0]
            if start > 0:
                container.seek(self.origin + int(start / self.time_base), stream=stream, backward=True)
            decoded = 0
            for frame in self._frames(container, stream):
                decoded += 1
                yield self._seconds(frame.pts), _lazy(lambda frame=frame: frame.to_image(threads=_SWS_THREADS))
            if not decoded:
                raise DataError(f"video '{self.path}' has no decodable frames; re-encode or replace it")
        finally:
            container.close()

    def _frames(self, container, stream) -> Iterator[av.VideoFrame]:
        try:
            for frame in container.decode(stream):
                if frame.pts is not None:
                    yield frame
        except (av.FFmpegError, OSError) as exc:
            raise DataError(f"cannot decode video '{self.path}' ({_reason(exc)}): the file is corrupt or "
                            "truncated; re-encode or replace it") from exc


class _FrameFiles(_Source):
    """Image files with their times: a frames folder or a frame list."""

    def __init__(self, name: str, paths: Sequence[str | Path], times: Sequence[float], frame_duration: float) -> None:
        self.name, self.paths, self.times, self.frame_duration = name, [str(p) for p in paths], list(times), frame_duration
        with _open_frame(self.paths[0]) as img:
            self.width, self.height = img.size

    def decode(self, start: float) -> Iterator[tuple[float, LazyImage]]:
        first = max(0, int(np.searchsorted(self.times, start, side="right")) - 1)
        for t, path in zip(self.times[first:], self.paths[first:]):
            yield t, _lazy(lambda path=path: load_image(path, "stop"))


def _open_frame(path: str):
    try:
        return Image.open(path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read frame '{path}' ({_reason(exc)}); check the file") from exc


def _lazy(make: Callable[[], Image.Image]) -> LazyImage:
    """``make`` called at most once."""
    kept: list[Image.Image] = []

    def get() -> Image.Image:
        if not kept:
            kept.append(make())
        return kept[0]

    return get


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _check_rate(value: float | None, what: str) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise DataError(f"{what} must be a positive number of frames a second, got {value!r}")


def _open_source(path: str | Path, frame_rate: float | None) -> _Source:
    """A video file, or a folder of image files shown ``frame_rate`` frames a second."""
    path = Path(path).expanduser()
    _check_rate(frame_rate, "frame_rate")
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"frames folder '{path}' holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                            "put the frames of the clip in it")
        if frame_rate is None:
            raise DataError(f"frames folder '{path}' needs its frame rate: pass frame_rate (in a record: \"fps\")")
        return _FrameFiles(str(path), files, [i / frame_rate for i in range(len(files))], 1.0 / frame_rate)
    if frame_rate is not None:
        raise DataError(f"frame_rate is for frames folders; video '{path}' has its own timestamps")
    return _VideoFile(path)


def _frame_list(paths: Sequence[str | Path], timestamps: Sequence[float] | None, frame_rate: float | None) -> _Source:
    """Frame files at ``timestamps`` (or ``frame_rate`` frames a second from 0)."""
    if not paths:
        raise DataError("a frame list needs at least one frame file")
    name = f"{paths[0]} (frame list of {len(paths)})"
    _check_rate(frame_rate, f"frame_rate of {name}")
    if timestamps is None:
        if frame_rate is None:
            raise DataError(f"frame list {name} needs timestamps or a frame rate (in a record: \"timestamps\" "
                            "or \"fps\")")
        return _FrameFiles(name, paths, [i / frame_rate for i in range(len(paths))], 1.0 / frame_rate)
    times = list(timestamps)
    if len(times) != len(paths):
        raise DataError(f"frame list {name} has {len(paths)} frames but {len(times)} timestamps; give one "
                        "timestamp per frame")
    if not all(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0 for t in times) or any(
            b <= a for a, b in zip(times, times[1:])):
        raise DataError(f"timestamps of frame list {name} must be increasing seconds >= 0, got {times[:8]}")
    gaps = np.diff(times)
    frame_duration = 1.0 / frame_rate if frame_rate else (float(np.median(gaps)) if len(gaps) else 1.0)
    return _FrameFiles(name, paths, times, frame_duration)


def _window(source: _Source, start: float, end: float | None) -> tuple[float, float]:
    """``[start, end)`` checked against the source; ``end=None`` is its end."""
    duration = source.duration
    for key, value in (("start", start), ("end", end)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise DataError(f"{key} of '{source.name}' must be a number of seconds, got {value!r}")
    if start < 0:
        raise DataError(f"start={start} of '{source.name}' is negative; {_WINDOW_FIX}")
    if start >= duration:
        raise DataError(f"start={start} is past the end of '{source.name}' (duration {duration:.3f} s); "
                        f"{_WINDOW_FIX}")
    if end is None:
        return float(start), duration
    if end <= start:
        raise DataError(f"end={end} is not after start={start} in '{source.name}'; {_WINDOW_FIX}")
    # Half a frame of slack: a window written as the rounded duration still fits.
    if end > duration + source.frame_duration / 2:
        raise DataError(f"end={end} is past the end of '{source.name}' (duration {duration:.3f} s); "
                        f"{_WINDOW_FIX}")
    return float(start), min(float(end), duration)


def _sample(source: _Source, grid: Iterable[float], start: float) -> Iterator[tuple[float, Image.Image]]:
    """``(g, image shown at g)`` for each time ``g`` of the increasing ``grid`` (all ``>= start``);
    times before the first frame are passed over."""
    times = iter(grid)
    g = next(times, None)
    shown: LazyImage | None = None
    for t, image in source.decode(start):
        while g is not None and g < t:
            if shown is not None:
                yield g, shown()
            g = next(times, None)
        if g is None:
            return
        shown = image
    while g is not None and shown is not None:
        yield g, shown()
        g = next(times, None)


def _iter(source: _Source, fps: float | None, start: float, end: float | None) -> Iterator[tuple[float, Image.Image]]:
    _check_rate(fps, "fps")
    start, stop = _window(source, start, end)
    if fps is None:
        return _between(source, start, stop)
    # Grid times as start + k / fps (not a running sum), so they do not drift over a long video.
    grid = (start + k / fps for k in range(math.ceil((stop - start) * fps - 1e-9)))
    return _sample(source, grid, start)


def _between(source: _Source, start: float, stop: float) -> Iterator[tuple[float, Image.Image]]:
    """Every frame with ``start <= time < stop``."""
    for t, image in source.decode(start):
        if t >= stop:
            return
        if t >= start:
            yield t, image()


def _clip(source: _Source, num_frames: int | None, fps: float | None, start: float,
          end: float | None) -> tuple[list[Image.Image], list[float]]:
    if num_frames is not None and fps is not None:
        raise ValueError("give num_frames or fps, not both")
    if num_frames is None:
        pairs = list(_iter(source, fps, start, end))
        if not pairs:
            raise DataError(f"clip [{start}, {end}) of '{source.name}' holds no frame; give a longer window")
        return [img for _, img in pairs], [t for t, _ in pairs]
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    start, stop = _window(source, start, end)
    inside = [t for t in source.times if start <= t < stop]
    if len(inside) < num_frames:
        raise DataError(
            f"clip [{start:g}, {stop:g}) of '{source.name}' has {len(inside)} frames, fewer than the {num_frames} "
            f"asked; give a longer clip or ask fewer frames (model.vision.num_frames)")
    # The middle frame of each of num_frames equal runs of the window's frames.
    chosen = [inside[int((i + 0.5) * len(inside) / num_frames)] for i in range(num_frames)]
    pairs = list(_sample(source, chosen, start))
    if len(pairs) != num_frames:
        raise DataError(f"video '{source.name}' decoded to fewer frames than its packets promise: the file is "
                        "corrupt or truncated; re-encode or replace it")
    return [img for _, img in pairs], [t for t, _ in pairs]


# --- the public functions -----------------------------------------------------------------------


def video_info(path: str | Path, *, frame_rate: float | None = None) -> VideoInfo:
    """Duration, frame rate, frame count and size of a video file or a frames folder.

    ``frame_rate`` (frames a second) is required for a folder and refused for a file. The frame
    rate is the median rate between frames; the duration runs to the end of the last frame.
    """
    return _open_source(path, frame_rate).info()


def iter_frames(
    path: str | Path, *, fps: float | None = None, start: float = 0.0, end: float | None = None,
    frame_rate: float | None = None,
) -> Iterator[tuple[float, Image.Image]]:
    """``(time, RGB image)`` of the frames of a video file or frames folder in ``[start, end)``.

    Without ``fps``: every decoded frame whose presentation time is in the window, at its time.
    With ``fps``: the times ``start + k / fps`` in the window, each with the latest frame at or
    before it. The file and the window are checked before the first frame is decoded; a bad one
    raises :class:`DataError`.
    """
    return _iter(_open_source(path, frame_rate), fps, start, end)


def read_clip(
    path: str | Path, *, num_frames: int | None = None, fps: float | None = None, start: float = 0.0,
    end: float | None = None, frame_rate: float | None = None,
) -> tuple[list[Image.Image], list[float]]:
    """``(frames, times)`` of a video file or frames folder in ``[start, end)``.

    ``num_frames``: that many frames spread uniformly over the window's frames (the middle one
    of each of ``num_frames`` equal runs); a window with fewer frames is a :class:`DataError` that
    says how many it has. ``fps``: as :func:`iter_frames`. Neither: every frame of the window.
    """
    return _clip(_open_source(path, frame_rate), num_frames, fps, start, end)


def read_frame_list(
    paths: Sequence[str | Path], timestamps: Sequence[float] | None = None, *, frame_rate: float | None = None,
    num_frames: int | None = None, fps: float | None = None, start: float = 0.0, end: float | None = None,
) -> tuple[list[Image.Image], list[float]]:
    """:func:`read_clip` of frame files at ``timestamps`` (increasing seconds), or ``frame_rate``
    frames a second from 0. The last frame is shown for the median gap between frames."""
    return _clip(_frame_list(paths, timestamps, frame_rate), num_frames, fps, start, end)


def load_clip(clip: Clip, *, num_frames: int | None = None, on_error: OnError = "stop") -> list[Image.Image] | None:
    """The frames of a record's clip (``num_frames`` of them, uniformly; None = every frame).

    A clip that cannot be read raises :class:`DataError` (``on_error="stop"``) or gives None
    (``on_error="skip"``).
    """
    check_on_error(on_error)
    try:
        if clip.frames:
            source = _frame_list(clip.frames, clip.timestamps or None, clip.fps)
        else:
            source = _open_source(clip.video, clip.fps if Path(clip.video).is_dir() else None)
        return _clip(source, num_frames, None, clip.start, clip.end)[0]
    except DataError as exc:
        if on_error == "skip":
            return None
        raise DataError(f"{exc}; {FIX}") from exc


def load_visual(item: str, *, num_frames: int = 1, on_error: OnError = "stop") -> list[Image.Image] | None:
    """The frames a vision encoder reads for a record's ``image``: ``[image]`` for an image path,
    ``num_frames`` frames for a :class:`~vljepa.data.formats.Clip` reference (:func:`load_clip`).

    An unreadable input raises :class:`DataError` (``on_error="stop"``) or gives None (``"skip"``).
    """
    clip = Clip.parse(item)
    if clip is None:
        image = load_image(item, on_error)
        return None if image is None else [image]
    return load_clip(clip, num_frames=num_frames, on_error=on_error)


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float) -> Path:
    """Write ``H x W x 3`` uint8 RGB frames at ``fps`` frames a second to ``path`` and return it.

    The suffix picks the codec: ``.mp4`` (H.264) or ``.webm`` (VP9), both yuv420p, so ``H`` and
    ``W`` must be even. The file is written under a temporary name in the same folder and renamed
    into place, so a reader never sees a partial video.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _ENCODERS:
        raise ValueError(f"cannot write video '{path}': use a {' or '.join(_ENCODERS)} suffix")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    fmt, codec, options = _ENCODERS[suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        count = _encode(tmp, frames, Fraction(fps).limit_denominator(1001), fmt, codec, options, path)
        if count == 0:
            raise ValueError(f"no frames to write to '{path}'")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _encode(tmp: str, frames: Iterable[np.ndarray], rate: Fraction, fmt: str, codec: str, options: dict,
            path: Path) -> int:
    """Encode ``frames`` into the file ``tmp``; returns how many there were."""
    count, shape = 0, None
    with av.open(tmp, "w", format=fmt, container_options={"fflags": "+bitexact"}) as container:
        stream = None
        for frame in frames:
            frame = np.asarray(frame)
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"frame {count} for '{path}' must be an H x W x 3 uint8 array, got "
                                 f"{frame.dtype} {frame.shape}")
            if shape is None:
                shape = frame.shape
                if shape[0] % 2 or shape[1] % 2:
                    raise ValueError(f"frames for '{path}' are {shape[1]} x {shape[0]}: width and height must be "
                                     "even for yuv420p video; crop or pad them")
                stream = container.add_stream(codec, rate=rate, options=options)
                stream.width, stream.height, stream.pix_fmt = shape[1], shape[0], "yuv420p"
                stream.codec_context.thread_count = 1
            elif frame.shape != shape:
                raise ValueError(f"frame {count} for '{path}' is {frame.shape}, the first was {shape}; "
                                 "every frame must have the same size")
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame = video_frame.reformat(format="yuv420p", threads=_SWS_THREADS)
            video_frame.pts = count
            container.mux(stream.encode(video_frame))
            count += 1
        if stream is not None:
            container.mux(stream.encode())
    return count
