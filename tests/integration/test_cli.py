"""The real CLI on the tiny world: world -> train (captions) -> train (mixed, from stage 1) -> eval
-> predict, resume, and every error path a user meets first (typos, wrong folders, bad data)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vljepa.cli import COMMANDS, main
from vljepa.config import load_config

N_TRAIN, N_TEST, N_COMP = 48, 16, 12
STEPS = 6  # 3 batches of 16 per epoch: two epochs, checkpoints at steps 2 and 4, the last at 6


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def world(work) -> Path:
    root = work / "world"
    rc = main(["world", "--out", str(root), "--seed", "0", "--train", str(N_TRAIN), "--test", str(N_TEST),
               "--comp", str(N_COMP), "--image-size", "32"])
    assert rc == 0
    return root


@pytest.fixture(scope="module")
def run_args(work, world, make_tiny_overrides):
    """``train`` arguments for the tiny model on the world's train split (plus ``extra``)."""

    def args(out: Path, *extra: str) -> list[str]:
        return ["train", *make_tiny_overrides("token"), f"data.train={world / 'train'}",
                f"data.cache_dir={work / 'cache'}", f"train.output_dir={out}", "train.batch_size=16",
                f"train.max_steps={STEPS}", "train.save_every=2", "train.keep_last=2", "train.log_every=1",
                "train.progress=false", "optim.warmup_steps=2", *extra]

    return args


@pytest.fixture(scope="module")
def stage1(work, run_args) -> Path:
    out = work / "stage1"
    assert main(run_args(out, "data.task=caption")) == 0
    return out


@pytest.fixture(scope="module")
def stage2(work, world, run_args, stage1) -> tuple[Path, str]:
    out = work / "stage2"
    # lr 0 leaves the weights where init_from put them, so the test can see that it loaded them.
    with _capture() as cap:
        rc = main([*run_args(out, "data.task=mixed", f"train.init_from={stage1 / 'model'}", "train.max_steps=2",
                             "optim.lr=0", "optim.weight_decay=0", "eval.tasks=[vqa]"),
                   "--eval-split", str(world / "test")])
    assert rc == 0
    return out, cap.text


class _capture:
    """Capture stdout of an in-process CLI call outside pytest's per-test capsys."""

    def __enter__(self):
        import io

        self._old, self._buf = sys.stdout, io.StringIO()
        sys.stdout = self._buf
        return self

    def __exit__(self, *exc):
        sys.stdout = self._old
        self.text = self._buf.getvalue()
        self._old.write(self.text)


def test_world_command_writes_the_library_world(world, tiny_world):
    # The CLI and generate_world(seed=0, the same sizes) write the same world.
    assert json.loads((world / "world.json").read_text()) == json.loads((tiny_world.root / "world.json").read_text())
    for split in ("train", "test", "comp"):
        for name in ("metadata.jsonl", "questions.jsonl"):
            assert (world / split / name).read_bytes() == (tiny_world.root / split / name).read_bytes()
    assert (world / "test" / "images" / "000003.png").read_bytes() == \
        (tiny_world.root / "test" / "images" / "000003.png").read_bytes()
    assert len(list((world / "train" / "images").iterdir())) == N_TRAIN


def test_train_writes_config_metrics_checkpoints_and_model(stage1, world, run_args):
    cfg = load_config(stage1 / "config.yaml")  # the resolved config reads back as a config
    assert cfg == load_config(None, run_args(stage1, "data.task=caption")[1:])
    assert cfg.model.vision.kind == "vit" and cfg.model.embed_dim == 16
    logged = _lines(stage1 / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    assert logged[-1]["lr"] == pytest.approx(1e-3 * cfg.optim.min_lr_ratio)  # cosine ended at the floor
    assert sorted(p.name for p in (stage1 / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert json.loads((stage1 / "checkpoints" / "step_00000006" / "trainer.json").read_text())["step"] == STEPS
    summary = json.loads((stage1 / "train_summary.json").read_text())
    assert summary["steps"] == STEPS and summary["skipped"]["total"] == 0
    assert summary["parameters"]["text"]["trainable"] == 0 and summary["parameters"]["predictor"]["frozen"] == 0
    meta = json.loads((stage1 / "model" / "config.json").read_text())
    assert meta["format"] == "vljepa" and meta["model"]["target_head"] == "token"


def test_second_stage_mixed_starts_from_the_first(stage1, stage2, world):
    out, printed = stage2
    n_examples = len(_lines(world / "train" / "metadata.jsonl")) + len(_lines(world / "train" / "questions.jsonl"))
    assert f"examples {n_examples} " in printed  # captions and questions
    # Caption texts and images come from the cache stage 1 wrote; the answers are new.
    assert "cache hits {'images': True, 'texts0': True, 'texts1': False}" in printed
    assert load_config(out / "config.yaml").train.init_from == str(stage1 / "model")
    first, second = load_file(str(stage1 / "model" / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    assert first.keys() == second.keys()
    for k in first:
        assert torch.equal(first[k], second[k]), k  # lr 0: exactly the stage-1 weights
    # --eval-split evaluated the final model on the test split (eval.tasks from the overrides).
    summary = json.loads((out / "train_summary.json").read_text())
    assert set(summary["eval"]) == {"split", "vqa", "skipped"}
    assert summary["eval"]["vqa"]["n"] == len(_lines(world / "test" / "questions.jsonl"))
    logged = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 2] and logged[-1]["eval"] == summary["eval"]


def test_eval_writes_the_documented_report(stage2, world, work, capsys):
    out = work / "reports" / "test.json"
    rc = main(["eval", "--model", str(stage2[0] / "model"), "--split", str(world / "test"), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "VQA accuracy" in printed and f"report written to {out}" in printed
    report = json.loads(out.read_text())
    assert set(report) == {"split", "retrieval", "classify", "vqa", "skipped"}
    r = report["retrieval"]
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
        assert 0.0 <= r[key] <= 1.0, key
    assert r["i2t_R@1"] <= r["i2t_R@5"] <= r["i2t_R@10"]
    assert r["n_images"] == N_TEST and {"i2t_median_rank", "t2i_mean_rank"} <= set(r)
    assert set(report["classify"]) >= {"top1", "top5", "n", "per_class_top1"}
    assert report["classify"]["top1"] <= report["classify"]["top5"]
    vqa = report["vqa"]
    assert vqa["n"] == len(_lines(world / "test" / "questions.jsonl"))
    assert set(vqa["per_type"]) == {"color", "shape", "size", "count", "exist", "relation", "yesno"}
    assert sum(v["n"] for v in vqa["per_type"].values()) == vqa["n"]
    assert report["skipped"]["total"] == 0
    # --tasks limits the report; eval.* overrides reach the evaluation config.
    rc = main(["eval", "--model", str(stage2[0] / "model"), "--split", str(world / "test"), "--tasks", "vqa",
               "--out", str(out), "eval.batch_size=5"])
    assert rc == 0 and set(json.loads(out.read_text())) == {"split", "vqa", "skipped"}


def test_predict_prints_candidates(stage2, world, work, capsys):
    image = world / "test" / "images" / "000000.png"
    model = str(stage2[0] / "model")
    rc = main(["predict", "--model", model, "--image", str(image), "--question", "what color is the square?",
               "--answers", "red, orange ,blue,green", "-k", "3"])
    assert rc == 0
    rows = [line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 3
    scores = [float(s) for s, _ in rows]
    assert all(-1.0 <= s <= 1.0 for s in scores) and scores == sorted(scores, reverse=True)
    assert {t for _, t in rows} <= {"red", "orange", "blue", "green"}
    bank = work / "answers.txt"
    bank.write_text("yes\n\nno\n")
    assert main(["predict", "--model", model, "--image", str(image), "--question", "is there a star?",
                 "--candidates", str(bank), "-k", "5"]) == 0
    assert sorted(line.split()[1] for line in capsys.readouterr().out.strip().splitlines()) == ["no", "yes"]
    with pytest.raises(SystemExit, match="is not a file"):
        main(["predict", "--model", model, "--image", str(image), "--candidates", str(work / "none.txt")])
    with pytest.raises(SystemExit, match="no candidate answers given"):
        main(["predict", "--model", model, "--image", str(image), "--answers", " , "])


@pytest.fixture(scope="module")
def resumed(work, run_args, stage1) -> tuple[Path, str]:
    """Stage 1 stopped after its step-4 checkpoint, then resumed with the same config."""
    out = work / "resumed"
    shutil.copytree(stage1 / "checkpoints" / "step_00000004", out / "checkpoints" / "step_00000004")
    with _capture() as cap:
        rc = main([*run_args(out, "data.task=caption"), "--resume"])
    assert rc == 0
    return out, cap.text


def test_resume_continues_from_the_last_checkpoint(resumed):
    out, printed = resumed
    assert f"resumed from {out / 'checkpoints' / 'step_00000004'} at step 4" in printed
    assert [r["step"] for r in _lines(out / "metrics.jsonl")] == [5, 6]  # only the remaining steps ran
    assert json.loads((out / "train_summary.json").read_text())["steps"] == STEPS
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert (out / "model" / "model.safetensors").is_file()


def test_resumed_run_equals_the_uninterrupted_run(resumed, stage1):
    straight = load_file(str(stage1 / "model" / "model.safetensors"))
    again = load_file(str(resumed[0] / "model" / "model.safetensors"))
    different = [k for k in straight if not torch.equal(straight[k], again[k])]
    assert different == []


def test_resume_without_a_checkpoint_is_an_error(work, run_args, capsys):
    rc = main([*run_args(work / "fresh", "train.max_steps=1"), "--resume"])
    assert rc == 2
    assert "--resume: no checkpoint under" in capsys.readouterr().err


def test_config_typo_exits_2_and_names_the_key(work, run_args, capsys):
    rc = main(run_args(work / "typo", "optim.lrr=1e-3"))
    assert rc == 2
    assert "error: unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in capsys.readouterr().err
    assert not (work / "typo").exists()  # nothing was started


def test_eval_of_a_folder_that_is_not_a_model_exits_2(world, capsys):
    rc = main(["eval", "--model", str(world / "train"), "--split", str(world / "test")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"error: '{world / 'train'}' is not a vljepa model folder: no config.json" in err
    assert "model.safetensors" in err  # says what a model folder holds


def test_eval_and_predict_data_errors_exit_2(stage2, world, work, capsys):
    model = str(stage2[0] / "model")
    assert main(["eval", "--model", model, "--split", str(work / "no_split")]) == 2
    assert f"dataset folder '{work / 'no_split'}' does not exist" in capsys.readouterr().err
    missing = work / "missing.png"
    assert main(["predict", "--model", model, "--image", str(missing), "--answers", "yes,no"]) == 2
    assert f"cannot read image '{missing}'" in capsys.readouterr().err


def test_eval_unknown_task_exits_2(stage2, world, capsys):
    rc = main(["eval", "--model", str(stage2[0] / "model"), "--split", str(world / "test"), "--tasks", "retreival"])
    assert rc == 2
    assert "unknown eval.tasks ['retreival']" in capsys.readouterr().err


def test_world_bad_arguments_exit_2(work, capsys):
    rc = main(["world", "--out", str(work / "bad_world"), "--image-size", "8"])
    assert rc == 2
    assert "image_size must be at least 16 pixels, got 8" in capsys.readouterr().err


def _broken_split(src: Path, dst: Path) -> dict[str, Path]:
    """A copy of a train split with a missing image, a truncated PNG and an empty caption."""
    shutil.copytree(src, dst)
    records = _lines(dst / "metadata.jsonl")
    missing, truncated = dst / records[0]["file_name"], dst / records[1]["file_name"]
    missing.unlink()
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    records[2]["captions"] = ["", *records[2]["captions"]]
    (dst / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"missing": missing, "truncated": truncated}


def test_missing_image_with_stop_fails_naming_the_file(tiny_world, work, run_args, capsys):
    split = work / "missing_only"
    shutil.copytree(tiny_world.root / "train", split)
    (split / "images" / "000005.png").unlink()
    rc = main(run_args(work / "stop_missing", f"data.train={split}", "data.on_error=stop"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "image not found ('images/000005.png' is not in" in err and "metadata.jsonl:6" in err
    assert "set data.on_error=skip" in err


def test_truncated_png_with_stop_fails_naming_the_file(tiny_world, work, run_args, capsys):
    split = work / "truncated_only"
    shutil.copytree(tiny_world.root / "train", split)
    png = split / "images" / "000007.png"
    png.write_bytes(png.read_bytes()[:60])
    rc = main(run_args(work / "stop_truncated", f"data.train={split}", "data.on_error=stop"))
    assert rc == 2
    err = capsys.readouterr().err
    assert f"cannot read image '{png}'" in err and "set data.on_error=skip" in err


def test_bad_records_are_skipped_and_counted(tiny_world, work, run_args, capsys):
    split = work / "broken"
    bad = _broken_split(tiny_world.root / "train", split)
    out = work / "skip_run"
    rc = main(run_args(out, f"data.train={split}", "data.on_error=skip", "train.max_steps=2"))
    assert rc == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2
    skipped = summary["skipped"]
    assert skipped["counts"] == {"image not found": 1, "empty caption": 1, "unreadable image": 1,
                                 "record of an unreadable image": 1}
    assert skipped["total"] == 4
    assert skipped["examples"]["unreadable image"] == [str(bad["truncated"])]
    assert skipped["examples"]["image not found"][0].endswith("metadata.jsonl:1")
    assert skipped["examples"]["empty caption"][0].endswith("metadata.jsonl:3")
    assert f"examples {N_TRAIN - 2} " in capsys.readouterr().out  # two records dropped, the third kept
    # eval follows --on-error the same way and reports what it skipped.
    report = work / "reports" / "broken.json"
    rc = main(["eval", "--model", str(out / "model"), "--split", str(split), "--tasks", "retrieval",
               "--on-error", "skip", "--out", str(report)])
    assert rc == 0
    result = json.loads(report.read_text())
    assert result["retrieval"]["n_images"] == N_TRAIN - 2
    assert result["skipped"]["counts"] == {"image not found": 1, "empty caption": 1, "unreadable image": 1}


HELP_OPTIONS = {
    "quickstart": ["--out", "--small", "--grounded", "--processes"],
    "world": ["--out", "--seed", "--train", "--test", "--comp", "--image-size", "--captions", "--video",
              "--clip-seconds", "--fps"],
    "train": ["--config", "--resume", "--eval-split", "Overrides are dotted keys"],
    "eval": ["--model", "--split", "--tasks", "--out", "--on-error", "Overrides are dotted keys"],
    "predict": ["--model", "--image", "--question", "--candidates", "--answers", "-k"],
    "summary": ["--config", "Overrides are dotted keys"],
    "train-decoder": ["--model", "--data", "--config", "Overrides are dotted keys"],
    "stream": ["--model", "--video", "--bank", "--captions", "--policy", "--rate", "--threshold", "--max-gap",
               "--stride", "--query", "--out"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_help_exits_0_and_lists_its_options(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vljepa {command}")
    for option in HELP_OPTIONS[command]:
        assert option in out, option


def test_top_level_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS) and "vljepa quickstart --out runs/quickstart" in out
    assert main([]) == 2  # no command: help, and a usage exit code
    assert "usage: vljepa" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["world", "--out", "x", "optim.lr=1"])  # world takes no overrides
    assert exc.value.code == 2
    assert "unrecognized arguments: optim.lr=1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_console_script_help():
    script = Path(sys.executable).with_name("vljepa")
    assert script.is_file(), "the console script is installed with the package"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: vljepa") and "quickstart" in done.stdout and "predict" in done.stdout


def test_summary_prints_parameter_counts(make_tiny_overrides, tiny_model, capsys):
    assert main(["summary", *make_tiny_overrides("token")]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.strip().splitlines()[1:]}
    expected = tiny_model.parameter_summary()
    for part, counts in expected.items():
        assert rows[part] == [f"{counts['trainable']:,}", f"{counts['frozen']:,}"], part
    assert rows["total"][0] == f"{sum(c['trainable'] for c in expected.values()):,}"
