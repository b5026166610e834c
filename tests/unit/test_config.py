"""Typed config: YAML + dotted overrides, errors that name the key, inheritance, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from vljepa.config import (
    ConfigError,
    DecoderTrainConfig,
    EvalConfig,
    RunConfig,
    config_dir,
    load_config,
    parse_override,
    save_config,
)

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_files_or_overrides():
    assert load_config() == RunConfig()


def test_override_scientific_notation_is_a_float():
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 0.0003)
    cfg = load_config(None, ["optim.lr=3e-4", "train.max_steps=7", "optim.betas=[0.8, 0.9]",
                             "eval.tasks=[vqa]", "train.progress=false", "data.train=runs/e1"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 0.0003
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.betas == (0.8, 0.9)  # a list in YAML, a tuple in the config
    assert cfg.eval.tasks == ["vqa"]
    assert cfg.train.progress is False
    assert cfg.data.train == "runs/e1"  # strings containing an 'e' stay strings


def test_string_fields_take_the_override_text_as_written():
    cfg = load_config(None, ["train.output_dir=2024.01", "data.train=no", "train.init_from=1e5"])
    assert (cfg.train.output_dir, cfg.data.train, cfg.train.init_from) == ("2024.01", "no", "1e5")


def test_integer_is_accepted_for_a_float_field():
    cfg = load_config(None, ["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_yaml_file_then_overrides_later_wins(tmp_path):
    a = _write(tmp_path / "a.yaml", "optim:\n  lr: 0.5\n  warmup_steps: 3\ntrain:\n  seed: 4\n")
    b = _write(tmp_path / "b.yaml", "optim:\n  lr: 0.25\n")
    cfg = load_config([a, b], ["train.seed=9"])
    assert cfg.optim.lr == 0.25  # b wins over a
    assert cfg.optim.warmup_steps == 3  # merged, not replaced, by b
    assert cfg.train.seed == 9  # overrides win over files


def test_unknown_override_key_suggests_the_closest():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["optim.lrr=1"])
    assert str(exc.value) == "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"


def test_unknown_section_and_far_key():
    with pytest.raises(ConfigError, match=r"unknown key 'optimm' \(did you mean 'optim'\?\)"):
        load_config(None, ["optimm.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'model.vision.zzz' \(valid keys: kind, image_size"):
        load_config(None, ["model.vision.zzz=1"])


def test_unknown_key_in_yaml_names_the_full_path(tmp_path):
    path = _write(tmp_path / "c.yaml", "model:\n  predictor:\n    deph: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model\.predictor\.deph' \(did you mean 'model\.predictor\.depth'\?\)"):
        load_config(path)


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match=r"'optim.lr' is a value, not a section; cannot set 'optim.lr.x'"):
        load_config(None, ["optim.lr.x=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=abc", "'train.max_steps' must be an integer, got 'abc'"),
        ("train.max_steps=2.5", "'train.max_steps' must be an integer, got 2.5"),
        ("train.progress=1", "'train.progress' must be true or false, got 1"),
        ("optim.lr=fast", "'optim.lr' must be a number, got 'fast'"),
        ("optim.betas=[0.9]", "'optim.betas' must have 2 items, got 1"),
        ("optim.betas=0.9", "'optim.betas' must be a list, got 0.9"),
        ("eval.tasks=[1]", "'eval.tasks[0]' must be a string, got 1"),
        ("model.vision=3", "'model.vision' must be a mapping of VisionConfig fields, got 3"),
    ],
)
def test_wrong_type_names_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert str(exc.value) == message


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("data.task=captions", "data.task", "['caption', 'vqa', 'mixed']"),
        ("model.loss.kind=mse", "model.loss.kind", "['infonce', 'cosine', 'l2', 'smooth_l1']"),
        ("train.precision=fp8", "train.precision", "['no', 'bf16', 'fp16', 'auto']"),
        ("data.on_error=ignore", "data.on_error", "['stop', 'skip']"),
    ],
)
def test_literal_values_are_checked(override, key, allowed):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert str(exc.value) == f"'{key}' must be one of {allowed}, got '{override.split('=')[1]}'"
    good = allowed.split("'")[3]  # the second allowed value (the first, "no", has its own test)
    section, name = override.split("=")[0].rsplit(".", 1)
    cfg = load_config(None, [f"{section}.{name}={good}"])
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == good


def test_precision_no_is_accepted_from_overrides_and_yaml(tmp_path):
    # YAML 1.1 reads an unquoted `no` as false; "no" is the default precision and the fix the
    # trainer's NaN error suggests, so it must be accepted as written.
    assert load_config(None, ["train.precision=no"]).train.precision == "no"
    path = _write(tmp_path / "p.yaml", "train:\n  precision: no\neval:\n  precision: no\n")
    cfg = load_config(path)
    assert (cfg.train.precision, cfg.eval.precision) == ("no", "no")


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="has an empty key"):
        load_config(None, ["=3"])
    with pytest.raises(ConfigError, match="cannot read value"):
        load_config(None, ["optim.betas=[0.9"])


def test_base_inheritance_is_relative_to_the_file(tmp_path):
    _write(tmp_path / "model" / "m.yaml", "model:\n  embed_dim: 64\n  predictor:\n    depth: 2\n    heads: 2\n")
    child = _write(tmp_path / "train" / "t.yaml",
                   "base: ../model/m.yaml\nmodel:\n  predictor:\n    depth: 3\noptim:\n  lr: 0.002\n")
    grandchild = _write(tmp_path / "g.yaml", "base: train/t.yaml\ntrain:\n  max_steps: 5\n")
    cfg = load_config(grandchild)
    assert cfg.model.embed_dim == 64  # from the base
    assert cfg.model.predictor.heads == 2  # from the base, next to an overridden sibling
    assert cfg.model.predictor.depth == 3  # the child wins
    assert cfg.optim.lr == 0.002 and cfg.train.max_steps == 5
    assert load_config(child).train.max_steps == RunConfig().train.max_steps


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping at the top level"):
        load_config(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(_write(tmp_path / "bad.yaml", "a: [1\n"))
    with pytest.raises(ConfigError, match=r"config file '.*missing_base\.yaml' not found"):
        load_config(_write(tmp_path / "child.yaml", "base: missing_base.yaml\n"))


def test_base_cycle_is_a_config_error(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    b = _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="a.yaml"):
        load_config(b)


def test_save_then_load_round_trip_is_equal(tmp_path):
    cfg = load_config(None, [
        "optim.lr=3e-4", "optim.betas=[0.85, 0.95]", "data.task=mixed", "data.on_error=skip",
        "model.vision.kind=vit", "model.target_head=token", "eval.tasks=[retrieval, classify]",
        "eval.classnames=[red circle, blue star]", "train.output_dir=runs/x", "train.precision=bf16",
    ])
    path = save_config(cfg, tmp_path / "deep" / "config.yaml")
    assert path.is_file()
    back = load_config(path)
    assert back == cfg
    assert isinstance(back.optim.betas, tuple)
    # Sections can be read back on their own as well.
    assert dataclasses.asdict(load_config(None, [], cls=EvalConfig)) == dataclasses.asdict(RunConfig().eval)


def test_eval_config_class_is_checked_on_its_own():
    cfg = load_config(None, ["tasks=[vqa]", "max_images=3"], cls=EvalConfig)
    assert cfg.tasks == ["vqa"] and cfg.max_images == 3
    with pytest.raises(ConfigError, match=r"unknown key 'max_image' \(did you mean 'max_images'\?\)"):
        load_config(None, ["max_image=3"], cls=EvalConfig)


def test_shipped_yaml_configs_all_load():
    # The package ships the quickstart's run configs; the repository's configs/ holds the experiment
    # configs users copy (configs/accelerate/ are `accelerate launch --config_file` files, not run configs).
    files = sorted(config_dir().rglob("*.yaml"))
    assert {f.relative_to(config_dir()).as_posix() for f in files} == {
        "model/quickstart.yaml", "model/video.yaml", "train/quickstart_stage1.yaml", "train/quickstart_stage2.yaml",
        "train/vqa.yaml", "train/video.yaml", "train/decoder.yaml"}
    repo = sorted(f for f in REPO_CONFIGS.rglob("*.yaml") if f.relative_to(REPO_CONFIGS).parts[0] != "accelerate")
    assert {"paper/stage1.yaml", "paper/stage2.yaml"} <= {f.relative_to(REPO_CONFIGS).as_posix() for f in repo}
    decoder = config_dir() / "train" / "decoder.yaml"  # `vljepa train-decoder`, not a training run
    assert isinstance(load_config(decoder, cls=DecoderTrainConfig), DecoderTrainConfig)
    for f in files + repo:
        if f != decoder:
            assert isinstance(load_config(f), RunConfig), f
    stage1 = load_config(config_dir() / "train" / "quickstart_stage1.yaml")
    stage2 = load_config(config_dir() / "train" / "quickstart_stage2.yaml")
    # Both stages inherit the quickstart model through `base:` (stage 2 can start from stage 1's weights);
    # only the loss differs: stage 2 adds the target-uniformity term.
    model = load_config(config_dir() / "model" / "quickstart.yaml").model
    assert stage1.model == model
    assert dataclasses.replace(stage2.model, loss=stage1.model.loss) == model
    assert (stage1.model.loss.target_uniformity, stage2.model.loss.target_uniformity) == (0.0, 1.0)
    assert stage1.model.target_head == "hybrid" and stage1.model.vision.kind == "efficientnet_lite0"
    assert (stage1.data.task, stage2.data.task) == ("caption", "mixed")
    assert stage2.train.precision == stage1.train.precision == "auto"


def test_shipped_accelerate_configs_load_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((REPO_CONFIGS / "accelerate").glob("*.yaml"))
    assert files
    for f in files:
        cfg = load_config_from_file(str(f))
        assert cfg.num_processes >= 1 and cfg.mixed_precision in ("no", "bf16", "fp16"), f


def test_precision_auto_resolves_to_what_the_machine_runs(monkeypatch):
    import builtins
    import io

    from vljepa import embed
    from vljepa.train.trainer import with_resolved_precision

    def cpuinfo(flags):
        embed._cpu_flags.cache_clear()  # the flags are read once per process; each case reads anew
        real_open = builtins.open

        def fake_open(path, *a, **kw):
            if path == "/proc/cpuinfo":
                return io.StringIO(f"processor\t: 0\nflags\t\t: {flags}\n")
            return real_open(path, *a, **kw)
        return fake_open

    monkeypatch.setattr(builtins, "open", cpuinfo("fpu sse avx2 fma"))
    assert not embed.native_bf16("cpu") and embed.resolve_precision("auto", "cpu") == "no"
    monkeypatch.setattr(builtins, "open", cpuinfo("avx2 avx512f avx512_bf16"))
    assert embed.native_bf16("cpu") and embed.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(builtins, "open", cpuinfo("avx2 amx_bf16 amx_tile"))
    assert embed.resolve_precision("auto", "cpu") == "bf16"
    assert embed.resolve_precision("fp16", "cpu") == "fp16" and embed.resolve_precision("no", "cpu") == "no"
    cfg = load_config(None, ["train.precision=auto"])
    if not torch.cuda.is_available():
        assert with_resolved_precision(cfg).train.precision == "bf16"
    assert load_config(None, ["eval.precision=auto"]).eval.precision == "auto"
    embed._cpu_flags.cache_clear()  # leave no fake flags behind for later tests
