"""The real CLI trains on each source format (COCO captions, VQAv2, webdataset shards) listed in
data.sources; a weighted mixture of two sources is sampled by weight, and the skipped records of a
bad source are counted in train_summary.json."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from accelerate import Accelerator
from PIL import Image

from vljepa.cli import main
from vljepa.config import load_config
from vljepa.train.data import MixtureSampler, build_training_data

TINY = [
    "model.vision.kind=vit", "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.dim=32",
    "model.vision.depth=1", "model.vision.heads=2", "model.predictor.dim=32", "model.predictor.depth=1",
    "model.predictor.heads=2", "model.embed_dim=16", "train.precision=no", "train.progress=false",
    "train.batch_size=4", "train.max_steps=2",
]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def _sources(*sources: dict) -> str:
    return "data.sources=" + json.dumps(list(sources))  # JSON is YAML, as the override parser reads it


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def _coco(root: Path, n: int = 8) -> dict:
    (root / "images").mkdir(parents=True)
    names = list(COLORS)
    images, annotations = [], []
    for i in range(n):
        color = names[i % len(names)]
        Image.new("RGB", (32, 32), COLORS[color]).save(root / "images" / f"{i:012d}.jpg")
        images.append({"id": i, "file_name": f"{i:012d}.jpg"})
        annotations += [{"image_id": i, "caption": f"a {color} square"}, {"image_id": i, "caption": f"all {color}"}]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return {"path": str(root / "captions.json"), "format": "coco", "images": str(root / "images"), "task": "caption"}


def _vqav2(root: Path, n: int = 4, missing: int = 0) -> dict:
    (root / "val2014").mkdir(parents=True)
    names = list(COLORS)
    questions, annotations = [], []
    for i in range(n):
        color = names[i % len(names)]
        if i >= missing:
            Image.new("RGB", (32, 32), COLORS[color]).save(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
        for j, (q, a, t) in enumerate([("what color is it?", color, "other"), ("is it a square?", "yes", "yes/no")]):
            qid = i * 10 + j
            questions.append({"question_id": qid, "image_id": i, "question": q})
            annotations.append({"question_id": qid, "multiple_choice_answer": a, "answer_type": t,
                                "answers": [{"answer": a}] * 9 + [{"answer": "maybe"}]})
    questions_file = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions_file.write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return {"path": str(questions_file), "format": "vqa", "images": str(root / "val2014"), "task": "vqa"}


def _webdataset(root: Path, n: int = 8, shards: int = 2, truncate_last: bool = False) -> dict:
    root.mkdir(parents=True)
    names = list(COLORS)
    for s in range(shards):
        path = root / f"train-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, n, shards):
                color = names[i % len(names)]
                for name, data in [(f"{i:06d}.png", _png(COLORS[color])), (f"{i:06d}.txt", f"a {color} square".encode())]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        if truncate_last and s == shards - 1:
            data = path.read_bytes().rstrip(b"\0")
            path.write_bytes(data[:-5])  # the last caption member's data ends early
    pattern = "train-{000000..%06d}.tar" % (shards - 1)
    return {"path": str(root / pattern), "format": "webdataset", "task": "caption"}


def _summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


@pytest.mark.parametrize("fmt", ["coco", "vqa", "webdataset"])
def test_cli_trains_on_each_format(tmp_path, fmt):
    source = {"coco": _coco, "vqa": _vqav2, "webdataset": _webdataset}[fmt](tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", _sources(source), *TINY, f"train.output_dir={out}"]) == 0
    assert (out / "model" / "model.safetensors").is_file()
    summary = _summary(out)
    assert summary["steps"] == 2 and summary["skipped"]["total"] == 0
    if fmt == "webdataset":
        assert len(list((out / "cache" / "webdataset").iterdir())) == 2  # each shard unpacked once


def test_weighted_mixture_and_skips_of_a_bad_source(tmp_path, tiny_model, make_tiny_overrides, capsys):
    good = {**_coco(tmp_path / "coco", n=8), "weight": 3.0}
    bad = {**_vqav2(tmp_path / "vqa", n=4, missing=1), "weight": 1.0}  # image 0 missing: its 2 questions
    shards = {**_webdataset(tmp_path / "wds", n=6, truncate_last=True), "weight": 1.0}

    # The sampler draws sources 3 : 1 whatever their sizes (8 caption records vs 6 questions).
    cfg = load_config(None, [*make_tiny_overrides("token"), _sources(good, bad), "data.on_error=skip",
                             "data.cache=false", f"train.output_dir={tmp_path / 'mix'}"])
    data = build_training_data(tiny_model, cfg, Accelerator(cpu=True))
    n_good = 8
    assert len(data.examples) == n_good + 6
    assert data.skipped.counts == {"image not found": 2}
    sampler = MixtureSampler(data.mixture, seed=0)
    draws = []
    for epoch in range(300):
        sampler.set_epoch(epoch)
        draws += list(sampler)
    share = sum(i < n_good for i in draws) / len(draws)
    assert abs(share - 0.75) < 0.03, share

    # Through the CLI, the bad sources' skips land in train_summary.json.
    out = tmp_path / "run"
    assert main(["train", _sources(good, bad, shards), "data.on_error=skip", *TINY, f"train.output_dir={out}"]) == 0
    skipped = _summary(out)["skipped"]
    assert skipped["counts"] == {"image not found": 2, "unreadable tar member": 1}
    assert skipped["total"] == 3
    assert any("questions[0]" in where for where in skipped["examples"]["image not found"])
    # with on_error=stop the same data is refused, naming the record and the fix
    capsys.readouterr()
    assert main(["train", _sources(good, bad), *TINY, f"train.output_dir={tmp_path / 'stop'}"]) == 2
    assert "questions[0]: image not found (looked for COCO_val2014_000000000000.jpg" in capsys.readouterr().err


def test_cli_skips_or_refuses_lines_that_are_not_utf8_and_paths_that_escape(tmp_path, capsys):
    split = tmp_path / "split"
    (split / "images").mkdir(parents=True)
    lines = []
    for i, color in enumerate([*COLORS, *COLORS]):
        Image.new("RGB", (32, 32), COLORS[color]).save(split / "images" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"images/{i}.png", "captions": [f"a {color} square"]}).encode())
    Image.new("RGB", (32, 32), COLORS["red"]).save(tmp_path / "secret.png")
    lines.insert(2, b'{"file_name": "images/0.png", "captions": ["caf\xe9"]}')
    lines.insert(5, json.dumps({"file_name": "../secret.png", "captions": ["a secret"]}).encode())
    (split / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    source = {"path": str(split), "format": "auto", "task": "caption"}

    out = tmp_path / "run"
    assert main(["train", _sources(source), "data.on_error=skip", *TINY, f"train.output_dir={out}"]) == 0
    skipped = _summary(out)["skipped"]
    metadata = split.resolve() / "metadata.jsonl"
    assert skipped["counts"] == {"line is not UTF-8": 1, "image path escapes the split folder": 1}
    assert skipped["examples"] == {"line is not UTF-8": [f"{metadata}:3"],
                                   "image path escapes the split folder": [f"{metadata}:6"]}
    capsys.readouterr()
    assert main(["train", _sources(source), *TINY, f"train.output_dir={tmp_path / 'stop'}"]) == 2
    err = capsys.readouterr().err
    assert f"{metadata}:3: line is not UTF-8" in err and "re-save the file as UTF-8" in err
