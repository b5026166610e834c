"""Video in: real .mp4 / .webm files written by write_video and read back (frame count, times,
pixels), frames folders and frame lists through the same API, every bad input as a DataError,
video records in split folders, clip cache keys, and a training step and an evaluation on clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vljepa.data.cache import cache_key, file_items
from vljepa.data.formats import Clip, DataError
from vljepa.data.readers import (
    iter_frames,
    load_visual,
    read_clip,
    read_frame_list,
    read_split,
    video_info,
    write_video,
)

FPS = 8
N_FRAMES = 10
H, W = 32, 48
# Each frame: two flat blocks of random colours, the edge on a multiple of 16 px, so 4:2:0 chroma
# blocks never straddle it. 8-bit RGB -> limited-range YUV -> RGB rounds each channel by up to
# about 2 levels, and CRF 18 / 24 coding of flat blocks adds about 1; 6 leaves room for either.
MAX_ERROR = 6
COLORS = np.random.default_rng(0).integers(0, 256, size=(N_FRAMES, 2, 3)).astype(np.uint8)


def _frame(k: int) -> np.ndarray:
    a = np.zeros((H, W, 3), np.uint8)
    a[:, :16], a[:, 16:] = COLORS[k, 0], COLORS[k, 1]
    return a


FRAMES = [_frame(k) for k in range(N_FRAMES)]


def _index(img: Image.Image) -> int:
    """Which of FRAMES an image is: the nearest in colour."""
    a = np.asarray(img).astype(int)
    return int(np.argmin([np.abs(a - f.astype(int)).mean() for f in FRAMES]))


@pytest.fixture(scope="module", params=[".mp4", ".webm"])
def video(request, tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / f"clip{request.param}", FRAMES, FPS)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("mp4") / "clip.mp4", FRAMES, FPS)


# --- write_video -> video_info / read_clip / iter_frames --------------------------------------------


def test_round_trip_frames_times_and_pixels(video):
    info = video_info(video)
    assert (info.num_frames, info.width, info.height) == (N_FRAMES, W, H)
    assert info.fps == pytest.approx(FPS) and info.duration == pytest.approx(N_FRAMES / FPS)
    frames, times = read_clip(video)
    assert times == pytest.approx([k / FPS for k in range(N_FRAMES)], abs=1e-6)
    assert all(f.mode == "RGB" and f.size == (W, H) for f in frames)
    error = np.stack([np.abs(np.asarray(f).astype(int) - g.astype(int)) for f, g in zip(frames, FRAMES)])
    assert error.max() <= MAX_ERROR


def test_write_video_is_deterministic_and_atomic(tmp_path):
    a = write_video(tmp_path / "a.mp4", FRAMES, FPS)
    b = write_video(tmp_path / "b.mp4", iter(FRAMES), FPS)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]  # no temporary file left


def test_read_clip_spreads_num_frames_over_the_window(video):
    frames, times = read_clip(video, num_frames=4)
    # 10 frames in 4 runs: the middle frame of each is 1, 3, 6, 8.
    assert [_index(f) for f in frames] == [1, 3, 6, 8]
    assert times == pytest.approx([1 / 8, 3 / 8, 6 / 8, 8 / 8])
    frames, times = read_clip(video, num_frames=2, start=0.5, end=1.0)  # frames 4..7
    assert [_index(f) for f in frames] == [5, 7]
    assert times == pytest.approx([5 / 8, 7 / 8])


def test_iter_frames_window_and_resampling(video):
    assert [t for t, _ in iter_frames(video, start=0.3, end=0.8)] == pytest.approx([3 / 8, 4 / 8, 5 / 8, 6 / 8])
    # At 3 fps from 0.3 s: times 0.3, 0.633, 0.967, each with the latest frame at or before it.
    pairs = list(iter_frames(video, fps=3, start=0.3))
    assert [t for t, _ in pairs] == pytest.approx([0.3, 0.3 + 1 / 3, 0.3 + 2 / 3])
    assert [_index(f) for _, f in pairs] == [2, 5, 7]
    up = list(iter_frames(video, fps=16, end=0.5))  # upsampled: every frame twice
    assert [_index(f) for _, f in up] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_frames_folder_and_frame_list_go_through_the_same_api(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    paths = []
    for k, f in enumerate(FRAMES[:6]):
        paths.append(folder / f"{k:04d}.png")
        Image.fromarray(f).save(paths[-1])
    (folder / "notes.txt").write_text("not a frame")
    info = video_info(folder, frame_rate=4)
    assert (info.num_frames, info.duration, info.width, info.height) == (6, 1.5, W, H)
    frames, times = read_clip(folder, num_frames=3, frame_rate=4)
    assert times == [0.25, 0.75, 1.25] and [_index(f) for f in frames] == [1, 3, 5]
    assert [np.asarray(f).tobytes() for f in frames] == [FRAMES[k].tobytes() for k in (1, 3, 5)]  # PNG is lossless
    frames, times = read_frame_list(paths[:3], [0.0, 1.0, 3.0], fps=1, end=4.0)
    assert times == [0.0, 1.0, 2.0, 3.0] and [_index(f) for f in frames] == [0, 1, 1, 2]
    frames, times = read_frame_list(paths[:4], frame_rate=2, num_frames=2)
    assert times == [0.5, 1.5] and [_index(f) for f in frames] == [1, 3]


# --- bad input -----------------------------------------------------------------------------------------


def test_bad_files(tmp_path, mp4):
    text = tmp_path / "notes.mp4"
    text.write_text("hello " * 50)
    with pytest.raises(DataError, match=r"cannot open video '.*notes.mp4'.*not a video file"):
        video_info(text)
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cannot open video '.*cut.mp4'.*truncated"):
        read_clip(truncated)
    png = tmp_path / "still.png"
    Image.fromarray(FRAMES[0]).save(png)
    with pytest.raises(DataError, match="is an image, not a video"):
        read_clip(png)
    with pytest.raises(DataError, match="does not exist"):
        read_clip(tmp_path / "gone.mp4")
    # Every byte of the coded frames zeroed: the packets are there, no frame decodes.
    data = bytearray(mp4.read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4 : at], "big")
    data[at + 4 : at - 4 + size] = bytes(size - 8)
    zeroed = tmp_path / "zeroed.mp4"
    zeroed.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"'.*zeroed.mp4'.*(no decodable frames|corrupt or truncated)"):
        read_clip(zeroed, num_frames=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        read_clip(empty, frame_rate=4)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_frames": 20}, r"has 10 frames, fewer than the 20 asked; give a longer clip or ask fewer frames"),
    ({"num_frames": 3, "start": 1.0}, r"clip \[1, 1.25\) .* has 2 frames, fewer than the 3 asked"),
    ({"start": 2.0}, r"start=2.0 is past the end of .* \(duration 1.250 s\)"),
    ({"end": 3.0}, r"end=3.0 is past the end"),
    ({"start": 0.5, "end": 0.5}, r"end=0.5 is not after start=0.5"),
    ({"start": -1.0}, r"start=-1.0 .* is negative"),
    ({"fps": 0}, r"fps must be a positive number"),
])
def test_bad_windows(mp4, kwargs, message):
    with pytest.raises(DataError, match=message):
        read_clip(mp4, **kwargs)


def test_bad_frame_sources(tmp_path, mp4):
    folder = tmp_path / "f"
    folder.mkdir()
    Image.fromarray(FRAMES[0]).save(folder / "0.png")
    with pytest.raises(DataError, match="needs its frame rate: pass frame_rate"):
        read_clip(folder)
    with pytest.raises(DataError, match="frame_rate is for frames folders"):
        read_clip(mp4, frame_rate=8)
    paths = [folder / "0.png"] * 2
    with pytest.raises(DataError, match="has 2 frames but 3 timestamps"):
        read_frame_list(paths, [0.0, 1.0, 2.0])
    with pytest.raises(DataError, match="must be increasing seconds"):
        read_frame_list(paths, [1.0, 1.0])
    with pytest.raises(DataError, match="needs timestamps or a frame rate"):
        read_frame_list(paths)
    with pytest.raises(ValueError, match="num_frames or fps, not both"):
        read_clip(mp4, num_frames=2, fps=2)


def test_write_video_refuses_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="width and height must be even"):
        write_video(tmp_path / "odd.mp4", [np.zeros((31, 32, 3), np.uint8)], FPS)
    with pytest.raises(ValueError, match=r"frame 1 .* every frame must have the same size"):
        write_video(tmp_path / "sizes.mp4", [FRAMES[0], np.zeros((16, 16, 3), np.uint8)], FPS)
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        write_video(tmp_path / "float.mp4", [FRAMES[0].astype(float)], FPS)
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "none.mp4", [], FPS)
    with pytest.raises(ValueError, match="use a .mp4 or .webm suffix"):
        write_video(tmp_path / "clip.gif", FRAMES, FPS)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind


# --- records ----------------------------------------------------------------------------------------------


@pytest.fixture()
def video_split(tmp_path, mp4) -> Path:
    split = tmp_path / "split"
    (split / "clips").mkdir(parents=True)
    (split / "clips/a.mp4").write_bytes(mp4.read_bytes())
    (split / "frames/c1").mkdir(parents=True)
    for k in range(4):
        Image.fromarray(FRAMES[k]).save(split / f"frames/c1/{k}.png")
    Image.fromarray(FRAMES[0]).save(split / "still.png")
    lines = [
        {"video": "clips/a.mp4", "start": 0.25, "end": 1.0, "captions": ["a window"]},
        {"video": "clips/a.mp4", "captions": ["the whole clip"]},
        {"video": "frames/c1", "fps": 4, "captions": ["a frames folder"]},
        {"frames": ["frames/c1/0.png", "frames/c1/2.png"], "timestamps": [0, 0.5], "captions": ["a frame list"]},
        {"file_name": "clips/a.mp4", "end": 0.5, "captions": ["a video as file_name"]},
        {"file_name": "still.png", "captions": ["an image"]},
    ]
    (split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (split / "questions.jsonl").write_text(json.dumps(
        {"video": "clips/a.mp4", "start": 0.5, "question": "what happened?", "answer": "nothing"}) + "\n")
    return split


def test_video_records_read_back(video_split):
    records, report = read_split(video_split, "caption")
    assert report.total == 0 and len(records) == 6
    window = records[0]
    assert window.clip == Clip(video=str(video_split / "clips/a.mp4"), start=0.25, end=1.0)
    assert window.image == window.clip.ref() and Clip.parse(window.image) == window.clip
    assert records[1].clip.end is None and records[1].image != window.image  # same file, other window
    assert records[2].clip.fps == 4.0 and records[3].clip.timestamps == (0.0, 0.5)
    assert records[4].clip.end == 0.5
    assert records[5].clip is None and records[5].image == str(video_split / "still.png")
    (question,), _ = read_split(video_split, "vqa")
    assert question.clip.start == 0.5 and question.answer == "nothing"
    frames = [load_visual(r.image, num_frames=2) for r in records]
    assert [len(f) for f in frames] == [2, 2, 2, 2, 2, 1]  # an image is one frame
    assert [_index(f) for f in frames[0]] == [3, 6]  # frames 2..7 of the window [0.25, 1.0)
    assert [_index(f) for f in frames[3]] == [0, 2]


@pytest.mark.parametrize("record, reason", [
    ({"video": "../outside.mp4"}, "image path escapes the split folder"),
    ({"video": "clips/gone.mp4"}, "video not found"),
    ({"video": "frames/c1"}, "frames folder without fps"),
    ({"video": "clips/a.mp4", "fps": 8}, "fps given for a video file"),
    ({"video": "clips/a.mp4", "start": 1.0, "end": 0.5}, "invalid end"),
    ({"video": "clips/a.mp4", "start": -1}, "invalid start"),
    ({"video": "clips/a.mp4", "start": "1"}, "invalid start"),
    ({"video": "clips/a.mp4", "file_name": "still.png"}, "record has more than one visual input"),
    ({"frames": ["frames/c1/0.png"]}, "frame list without timing"),
    ({"frames": ["frames/c1/0.png", "frames/c1/9.png"], "fps": 2}, "frame not found"),
    ({"frames": ["frames/c1/0.png", "frames/c1/1.png"], "timestamps": [1, 0]}, "invalid timestamps"),
    ({"frames": "frames/none", "fps": 2}, "frames folder not found"),
    ({"frames": []}, "invalid frames"),
])
def test_bad_video_records(video_split, record, reason):
    (video_split / "metadata.jsonl").write_text(json.dumps({**record, "captions": ["x"]}) + "\n"
                                                + json.dumps({"file_name": "still.png", "captions": ["y"]}) + "\n")
    with pytest.raises(DataError, match=f"metadata.jsonl:1: {reason}"):
        read_split(video_split, "caption")
    records, report = read_split(video_split, "caption", on_error="skip")
    assert len(records) == 1 and report.counts == {reason: 1}


def test_a_window_past_the_end_is_an_error_or_a_skip_when_read(video_split):
    (video_split / "metadata.jsonl").write_text(json.dumps({"video": "clips/a.mp4", "start": 5.0, "captions": ["x"]}))
    (record,), _ = read_split(video_split, "caption")
    with pytest.raises(DataError, match=r"start=5.0 is past the end of .*a.mp4.*set data.on_error=skip"):
        load_visual(record.image, num_frames=2)
    assert load_visual(record.image, num_frames=2, on_error="skip") is None


def test_clip_cache_items_keep_the_window_and_the_file_stamps(video_split):
    video = str(video_split / "clips/a.mp4")
    a, b = Clip(video=video, start=0.0, end=1.0).ref(), Clip(video=video, start=0.5, end=1.0).ref()
    items = file_items([a, b])
    assert items[0] != items[1] and items[0].startswith(a)
    before = file_items([a])
    Path(video).write_bytes(Path(video).read_bytes() + b"\0")
    assert file_items([a]) != before  # an edited video changes the key
    folder = Clip(video=str(video_split / "frames/c1"), fps=4).ref()
    assert file_items([folder])[0].count("|") == 3 * 4  # the ref, then |path|size|mtime of each of 4 frames
    assert cache_key({"num_frames": 2}, items) != cache_key({"num_frames": 4}, items)
    assert file_items([str(video_split / "still.png")])[0].count("|") == 2  # images as before


# --- training and evaluation on clips ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_clips(tmp_path_factory):
    from vljepa.data.world import generate_video_world

    return generate_video_world(tmp_path_factory.mktemp("clips"), seed=0, n_train=8, n_test=4, image_size=32)


def _clip_config(world_clips, out: Path, *extra: str):
    """The quickstart model (frozen EfficientNet-Lite0 + MiniLM) at 32 px on 2-frame clips, small predictor."""
    from vljepa.config import load_config

    config = Path(__file__).parents[2] / "vljepa/configs/model/quickstart.yaml"
    return load_config(str(config), [
        "model.vision.image_size=32", "model.vision.num_frames=2", "model.predictor.dim=32",
        "model.predictor.depth=1", "model.predictor.heads=2", f"data.train={world_clips.root / 'train'}",
        "data.task=mixed", "train.batch_size=4", "train.precision=no", f"train.output_dir={out}", *extra])


@pytest.fixture(scope="module")
def clip_model(world_clips, tmp_path_factory):
    from vljepa.models.vljepa import VLJepa

    torch.manual_seed(0)
    return VLJepa(_clip_config(world_clips, tmp_path_factory.mktemp("unused")).model).eval()


@pytest.mark.parametrize("cache", [True, False])
def test_a_training_step_on_clips(world_clips, clip_model, tmp_path, cache):
    """Cached visual tokens hold both frames of every clip; uncached batches carry [B, T, 3, H, W] pixels."""
    from accelerate import Accelerator

    from vljepa.train.data import build_training_data

    cfg = _clip_config(world_clips, tmp_path, f"data.cache={str(cache).lower()}")
    data = build_training_data(clip_model, cfg, Accelerator(cpu=True))
    assert len(data.images) == 8 and all(Clip.parse(item) for item in data.images)  # the clips, each once
    batch = data.collator(list(range(4)))
    tokens_per_frame = clip_model.vision.frame_num_tokens(32)
    if cache:
        assert batch["visual_tokens"].shape[:2] == (4, 2 * tokens_per_frame)
    else:
        assert batch["pixel_values"].shape == (4, 2, 3, 32, 32)
    clip_model.zero_grad()
    try:
        loss = clip_model.train()(batch).loss
        loss.backward()
    finally:
        clip_model.eval()
    assert torch.isfinite(loss) and loss.item() > 0
    grads = [p.grad for p in clip_model.predictor.parameters() if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)
    clip_model.zero_grad()


def test_retrieval_and_vqa_evaluation_on_clips(world_clips, clip_model):
    from vljepa.config import EvalConfig
    from vljepa.eval.report import evaluate

    report = evaluate(clip_model, world_clips.root / "test", EvalConfig(tasks=["retrieval", "vqa"]))
    assert report["retrieval"]["n_images"] == 4 and report["skipped"]["total"] == 0
    assert report["vqa"]["n"] == len((world_clips.root / "test/questions.jsonl").read_text().splitlines())
