"""Streams: sliding-window embeddings of a real MP4, captions from the policies, subtitle writers,
bad videos as clear errors, and the world stream generator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vljepa.cli import main
from vljepa.data.formats import DataError
from vljepa.data.readers.video import iter_frames, read_clip, write_video
from vljepa.data.world.stream import generate_stream
from vljepa.decode.nearest import CandidateBank
from vljepa.decode.selective import Online, Uniform, Ward
from vljepa.decode.stream import (
    Caption,
    StreamStep,
    bank_decoder,
    caption_stream,
    close_captions,
    embed_stream,
    merge_repeats,
    save_captions,
    text_at,
    to_srt,
    to_webvtt,
)
from vljepa.embed import pixel_loader
from vljepa.models.vljepa import VLJepa


def _video(path, n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return write_video(path, (rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)), fps=4)


@pytest.fixture(scope="module")
def two_frame_model(make_tiny_config):
    """The tiny model with a window of two frames (a learned temporal embedding on the ViT's tokens)."""
    torch.manual_seed(0)
    return VLJepa(make_tiny_config("token", "model.vision.num_frames=2")).eval()


def test_one_embedding_per_window_at_the_stride(tmp_path, tiny_model):
    video = _video(tmp_path / "v.mp4", 8)  # frames at 0.0, 0.25, ..., 1.75 s
    steps = list(embed_stream(tiny_model, iter_frames(video), stride_s=0.5))
    assert [s.index for s in steps] == [0, 1, 2, 3]
    assert [s.time for s in steps] == [0.0, 0.5, 1.0, 1.5]
    assert all(s.embedding.shape == (16,) for s in steps)
    # The step at 0.5 s is the model's prediction for the frame at 0.5 s.
    frames, _ = read_clip(video, start=0.5, end=0.75)
    expected = tiny_model.predict(pixel_loader(tiny_model)(frames[0])[None])[0]
    torch.testing.assert_close(steps[1].embedding, expected)


def test_a_fixed_query_is_asked_of_every_window(tmp_path, tiny_model):
    video = _video(tmp_path / "v.mp4", 3)
    steps = list(embed_stream(tiny_model, iter_frames(video), query="what color is it?", batch_size=2))
    frames, _ = read_clip(video)
    pixels = torch.stack([pixel_loader(tiny_model)(f) for f in frames])
    q = tiny_model.tokenize_queries(["what color is it?"] * 3)
    torch.testing.assert_close(torch.stack([s.embedding for s in steps]), tiny_model.predict(pixels, **q))


def test_windows_of_several_frames_and_batching_agree(tmp_path, two_frame_model):
    video = _video(tmp_path / "v.mp4", 6)
    one = list(embed_stream(two_frame_model, iter_frames(video), batch_size=1))
    batched = list(embed_stream(two_frame_model, iter_frames(video), batch_size=4))
    assert [(s.start, s.time) for s in one] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0), (1.0, 1.25)]
    torch.testing.assert_close(torch.stack([s.embedding for s in one]), torch.stack([s.embedding for s in batched]))
    frames, _ = read_clip(video, start=0.5, end=1.0)
    to_tensor = pixel_loader(two_frame_model)
    clip = torch.stack([to_tensor(f) for f in frames])[None]  # [1, 2, 3, H, W]
    torch.testing.assert_close(one[2].embedding, two_frame_model.predict(clip)[0])


def test_a_video_shorter_than_the_window_is_a_clear_error(tmp_path, two_frame_model):
    video = _video(tmp_path / "short.mp4", 1)
    with pytest.raises(DataError, match=r"short.mp4' has 1 frame\(s\), fewer than the model's window of 2 frames"):
        list(embed_stream(two_frame_model, iter_frames(video), source=str(video)))
    with pytest.raises(DataError, match="'live' has no frames"):
        list(embed_stream(two_frame_model, iter([]), source="live"))


def test_cli_reports_a_corrupt_video_as_a_message(tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    code = main(["stream", "--model", str(tmp_path / "no_model"), "--video", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "broken.mp4" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def _steps(pieces: list[int], protos: torch.Tensor) -> list[StreamStep]:
    """Steps 0.5 s apart whose embeddings are the given prototypes, each repeated, plus tiny noise."""
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([protos[k].expand(n, -1) for k, n in enumerate(pieces)])
    rows = torch.nn.functional.normalize(rows + 0.01 * torch.randn(rows.shape, generator=g), dim=-1)
    return [StreamStep(index=i, time=0.5 * i, start=0.5 * i, embedding=z) for i, z in enumerate(rows)]


def test_caption_stream_decodes_where_the_policy_says():
    protos = torch.eye(3, 8)
    bank = CandidateBank(["a red circle", "a blue star", "a green square"], protos)
    steps = _steps([6, 4, 6], protos)
    events = list(caption_stream(steps, Ward(n_segments=3), bank_decoder(bank)))
    assert [e for e in events if isinstance(e, StreamStep)] == steps  # every step, in order
    caps = [e for e in events if isinstance(e, Caption)]
    assert events[-3:] == caps  # offline: the captions come after the last step
    assert [(c.text, c.start, c.end, c.index) for c in caps] == [
        ("a red circle", 0.0, 3.0, 2), ("a blue star", 3.0, 5.0, 7), ("a green square", 5.0, 7.5, 12)]

    live = list(caption_stream(steps, Online(threshold=0.5), bank_decoder(bank)))
    at = [i for i, e in enumerate(live) if isinstance(e, Caption)]
    assert at == [1, 8, 13]  # each caption right after the step that triggered it
    caps = [live[i] for i in at]
    assert [(c.text, c.start, c.end) for c in caps] == [("a red circle", 0.0, None), ("a blue star", 3.0, None),
                                                         ("a green square", 5.0, None)]
    closed = close_captions(caps, end=8.0)
    assert [(c.start, c.end) for c in closed] == [(0.0, 3.0), (3.0, 5.0), (5.0, 8.0)]
    assert text_at(closed, [-1.0, 0.0, 2.9, 3.0, 7.9]) == ["", "a red circle", "a red circle", "a blue star",
                                                           "a green square"]


def test_merge_repeats_joins_consecutive_equal_texts():
    caps = [Caption(0.0, 1.0, "a", 0.0, 0), Caption(1.0, 2.0, "a", 1.0, 2), Caption(2.0, 3.0, "b", 2.0, 4)]
    assert merge_repeats(caps) == [Caption(0.0, 2.0, "a", 0.0, 0), Caption(2.0, 3.0, "b", 2.0, 4)]


def test_subtitle_writers_exact_format(tmp_path):
    caps = [Caption(0.0, 1.5, "a red circle", 0.0, 0), Caption(1.5, 3661.25, "a blue\nstar", 1.5, 3)]
    assert to_webvtt(caps) == ("WEBVTT\n\n"
                               "00:00:00.000 --> 00:00:01.500\na red circle\n\n"
                               "00:00:01.500 --> 01:01:01.250\na blue star\n")
    assert to_srt(caps) == ("1\n00:00:00,000 --> 00:00:01,500\na red circle\n\n"
                            "2\n00:00:01,500 --> 01:01:01,250\na blue star\n")
    with pytest.raises(ValueError, match="close them first"):
        to_srt([Caption(0.0, None, "x", 0.0, 0)])
    out = save_captions(tmp_path / "out", caps, caps[:1], {"policy": "ward"})
    record = json.loads((out / "captions.json").read_text())
    assert record["policy"] == "ward" and len(record["decodes"]) == 2 and len(record["captions"]) == 1
    assert record["decodes"][1] == {"start": 1.5, "end": 3661.25, "text": "a blue\nstar", "time": 1.5, "index": 3}
    assert (out / "captions.srt").read_text() == to_srt(caps[:1])
    assert (out / "captions.vtt").read_text().startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n")


def test_uniform_caption_count_over_a_stream():
    protos = torch.eye(2, 4)
    steps = _steps([10, 10], protos)  # 0.0 .. 9.5 s
    caps = [e for e in caption_stream(steps, Uniform(rate=0.5), bank_decoder(CandidateBank(["x", "y"], protos)))
            if isinstance(e, Caption)]
    assert [c.time for c in caps] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert [c.text for c in caps] == ["x", "x", "x", "y", "y"]


def test_world_stream_is_deterministic_with_timestamped_captions(tmp_path):
    kwargs = dict(seed=3, duration_s=12.0, fps=2.0, image_size=32, min_scene_s=2.0, max_scene_s=5.0)
    a = generate_stream(tmp_path / "a", **kwargs)
    b = generate_stream(tmp_path / "b", **kwargs)
    ann = json.loads(a.annotations.read_text())
    assert ann == json.loads(b.annotations.read_text())
    assert a.video.read_bytes() == b.video.read_bytes()
    assert ann["frames"] == 24 and [round(x["time"], 3) for x in ann["annotations"]] == [i + 0.5 for i in range(12)]
    scenes = ann["scenes"]
    assert scenes[0]["start"] == 0.0 and scenes[-1]["end"] == 12.0
    assert all(2.0 <= s["end"] - s["start"] <= 5.0 for s in scenes[:-1])
    assert all(x["captions"][0] != y["captions"][0] for x, y in zip(scenes, scenes[1:]))
    for note in ann["annotations"]:
        scene = scenes[note["scene"]]
        assert scene["start"] <= note["time"] < scene["end"] and note["captions"] == scene["captions"]
    frames = [np.asarray(img, dtype=np.int16) for _, img in iter_frames(a.video)]
    assert len(frames) == 24 and frames[0].shape == (32, 32, 3)
    assert np.abs(frames[0] - frames[1]).max() > 0  # same scene, yet not identical frames
