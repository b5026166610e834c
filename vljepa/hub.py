"""Saving, loading and sharing models: the model folder, its model card, Hub names.

A saved model is a folder: ``config.json`` (``format: vljepa``, the model config), ``model.safetensors``
(every weight, frozen towers included, so a reload is exact), ``text_encoder/`` (the Y-encoder's
tokenizer and config), ``vision_encoder/`` / ``predictor/`` where those architectures come from
outside the config, and a model card ``README.md``. A model with a light text decoder also has
``decoder/``: ``config.json`` (``format: vljepa.decoder``, the decoder config, the embedding width
and what else rebuilds it), ``model.safetensors`` (its weights) and, for hf_lm, ``lm/`` (the
language model's config and tokenizer).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from vljepa.atomic import atomic_folder
from vljepa.config import ConfigError, DecoderConfig, ModelConfig, config_dir, from_dict, to_dict

if TYPE_CHECKING:
    from torch import nn

FORMAT = "vljepa"
FORMAT_VERSION = 2
DECODER_FORMAT = "vljepa.decoder"
EXPECTED = "config.json (format=vljepa), model.safetensors and text_encoder/"


def save_model(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model`` (a ``VLJepa``) as a model folder; atomic, so an existing folder is replaced whole."""
    with atomic_folder(folder) as tmp:
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(model.config)}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        # The decoder has a folder of its own, so a model folder loads the same with or without it.
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                 if not k.startswith("decoder.")}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if getattr(model, "decoder", None) is not None:
            write_decoder(model.decoder, tmp / "decoder", trained_on=model.decoder_trained_on)
        model.text.save_files(tmp / "text_encoder")
        model.vision.save_files(tmp / "vision_encoder")  # writes only for architectures from a folder / Hub
        model.predictor.save_files(tmp / "predictor")
        (tmp / "README.md").write_text(model_card(model))
    return Path(folder)


def load_model(cls: type, name_or_path: str | Path, *, map_location: str = "cpu") -> nn.Module:
    """Build ``cls`` (``VLJepa``) from a model folder or ``hf-hub:owner/name`` and load its weights."""
    folder = resolve_model_folder(str(name_or_path))
    meta = read_model_meta(folder)
    config = from_dict(ModelConfig, meta["model"], prefix="model.")
    parts = {name: folder / name for name in ("predictor", "vision_encoder")}
    model = cls(config, load_weights=False, text_source=str(folder / "text_encoder"),
                predictor_source=str(parts["predictor"]) if parts["predictor"].is_dir() else None,
                vision_source=str(parts["vision_encoder"]) if parts["vision_encoder"].is_dir() else None)
    load_weights_into(model, folder, map_location=map_location)
    if (folder / "decoder").is_dir():
        model.decoder, model.decoder_trained_on = load_decoder(folder / "decoder", tokenizer=model.text.tokenizer,
                                                               map_location=map_location)
    return model.eval()


def write_decoder(decoder: nn.Module, folder: str | Path, *, trained_on: str = "",
                  files: dict[str, str] | None = None) -> Path:
    """Write a light text decoder as a ``decoder/`` folder (see the module doc); atomic.

    ``trained_on`` names the caption split it was trained on (the default nearest-neighbour bank
    of ``vljepa eval --tasks caption``); ``files`` are more text files to write (name -> text).
    """
    with atomic_folder(folder) as tmp:
        meta = {"format": DECODER_FORMAT, "decoder": to_dict(decoder.cfg), "embed_dim": decoder.embed_dim,
                "trained_on": trained_on, **decoder.extra_meta()}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        decoder.save_files(tmp)
        # save_model keeps one copy of tied weights (an LM head tied to its input embeddings).
        save_safetensors_model(decoder, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return Path(folder)


def load_decoder(folder: str | Path, *, tokenizer=None, map_location: str = "cpu") -> tuple[nn.Module, str]:
    """Rebuild a decoder from a ``decoder/`` folder: ``(decoder in eval mode, the split it was trained on)``.

    ``tokenizer``: the Y-encoder's (what a transformer decoder reads and writes).
    """
    from vljepa.models.decoder import build_decoder

    folder = Path(folder)
    cfg_file = folder / "config.json"
    try:
        meta = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"'{folder}' is not a decoder folder: cannot read config.json ({exc}); train it again "
                          "with `vljepa train-decoder`") from exc
    if not isinstance(meta, dict) or meta.get("format") != DECODER_FORMAT:
        raise ConfigError(f"'{cfg_file}' lacks format={DECODER_FORMAT}; train the decoder again with "
                          "`vljepa train-decoder`")
    cfg = from_dict(DecoderConfig, meta["decoder"], prefix="decoder.")
    decoder = build_decoder(cfg, embed_dim=meta["embed_dim"], tokenizer=tokenizer, vocab=meta.get("vocab"),
                            load_weights=False, source=folder)
    try:
        load_safetensors_model(decoder, str(folder / "model.safetensors"), strict=True, device=map_location)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ConfigError(f"'{folder}': cannot load the decoder weights ({str(exc).splitlines()[0]}); train the "
                          "decoder again with `vljepa train-decoder`") from exc
    return decoder.eval(), meta.get("trained_on", "")


def load_weights_into(model: nn.Module, folder: str | Path, *, map_location: str = "cpu",
                      what: str | None = None) -> None:
    """Load ``folder/model.safetensors`` into ``model``; every tensor must match (names and shapes).

    ``what`` names the setting that pointed at the folder, for the error (e.g. ``train.init_from``).
    """
    folder = Path(folder)
    file = folder / "model.safetensors"
    where = f"{what}='{folder}'" if what else f"'{file}'"
    try:
        state = load_file(str(file), device=map_location)
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{where}: cannot read {file.name} ({exc}); save the model again") from exc
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ
        raise ConfigError(f"{where} does not fit this model config ({str(exc).splitlines()[-1].strip()}); "
                          "use the model section of the run that saved it") from exc
    if missing or unexpected:
        raise ConfigError(f"{where} does not fit this model config (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}); use the model section of the run that saved it")


def resolve_model_folder(name: str) -> Path:
    """A local model folder, or a Hub repository (``hf-hub:owner/name``) fetched into the cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.startswith("hf-hub:"):
        from huggingface_hub import snapshot_download

        repo = name.split(":", 1)[1]
        try:
            return Path(snapshot_download(repo))
        except Exception as exc:  # noqa: BLE001 - any Hub failure gets the same advice
            raise ConfigError(f"cannot fetch '{repo}' from the Hugging Face Hub ({exc.__class__.__name__}); "
                              "offline, download it elsewhere and pass the local folder instead") from exc
    raise ConfigError(f"model '{name}' not found: give a folder written by save_pretrained or hf-hub:owner/name")


def read_model_meta(folder: Path) -> dict:
    """Read and check ``config.json`` of a saved model; the error says what a model folder holds."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"'{folder}' is not a vljepa model folder: no config.json (expected {EXPECTED})")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"'{cfg_file}' is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"'{folder}' is not a vljepa model folder: config.json lacks format=vljepa "
                          f"(expected {EXPECTED})")
    version = meta.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise ConfigError(f"'{folder}' was written by a newer vljepa (format {version}); upgrade vljepa")
    if version < FORMAT_VERSION:
        raise ConfigError(f"'{folder}' was written by an older vljepa (format {version}, this one reads "
                          f"{FORMAT_VERSION}); train or convert it again with this version")
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"'{folder}' has config.json but no model.safetensors (expected {EXPECTED})")
    return meta


def model_card(model: nn.Module) -> str:
    """A short model card: what the parts are, their parameter counts, how to load the model."""
    cfg = model.config
    if cfg.predictor.kind == "hf_lm":
        predictor = f"the last {cfg.predictor.num_layers} layers of `{cfg.predictor.path}`, bidirectional"
    else:
        predictor = f"{cfg.predictor.depth} layers x {cfg.predictor.dim} dims"
    text_mode = "frozen" if cfg.text.freeze else "trained"
    if cfg.text.lora.r:
        text_mode += f", LoRA r={cfg.text.lora.r}"
    rows = "\n".join(f"| {name} | {c['trainable']:,} | {c['frozen']:,} |"
                     for name, c in model.parameter_summary().items())
    return (
        "---\nlibrary_name: vljepa\ntags:\n- vl-jepa\n- joint-embedding\n---\n\n"
        "# VL-JEPA model\n\n"
        f"- X-encoder: `{cfg.vision.kind}` ({'frozen' if cfg.vision.freeze else 'trained'})\n"
        f"- Y-encoder: `{cfg.text.path}` ({cfg.text.kind}, {text_mode})\n"
        f"- Predictor: {predictor}; target head `{cfg.target_head}`\n"
        f"- Shared space: {cfg.embed_dim} dims; loss `{cfg.loss.kind}`\n\n"
        "| part | trainable | frozen |\n| --- | --- | --- |\n" + rows + "\n\n"
        "```python\nfrom vljepa import VLJepa\nmodel = VLJepa.from_pretrained(\"path/to/this/folder\")\n```\n"
    )


# Architecture-only copies (config files, no weights, no tokenizer) of the paper's three models,
# shipped under vljepa/configs/hf/ so the paper configuration builds and counts offline.
SHIPPED_ARCHITECTURES = {
    "facebook/vjepa2-vitl-fpc64-256": "hf/facebook/vjepa2-vitl-fpc64-256",
    "meta-llama/Llama-3.2-1B": "hf/meta-llama/Llama-3.2-1B",
    "google/embeddinggemma-300m": "hf/google/embeddinggemma-300m",
}


def architecture_only(config: ModelConfig) -> ModelConfig:
    """A copy of ``config`` that builds from local files only, for counting parameters.

    Hub ids listed in ``SHIPPED_ARCHITECTURES`` become the shipped folders; local folders are kept.
    Any other Hub id of an hf X-encoder, Y-encoder or hf_lm predictor is an error (building it would
    reach the network): point it at a local copy, where config.json (and modules.json) suffice.
    """
    from vljepa.models.text import resolve_text_path

    out = copy.deepcopy(config)
    for part in (out.vision, out.text, out.predictor):
        if part.path in SHIPPED_ARCHITECTURES:
            part.path = str(config_dir() / SHIPPED_ARCHITECTURES[part.path])
    if out.text.kind == "open_clip" and out.text.path.startswith("hf-hub:"):
        raise ConfigError(f"model.text.path '{out.text.path}' would be fetched from the Hub; use local-dir:FOLDER")
    for key, needed, path in [("model.vision.path", out.vision.kind == "hf", out.vision.path),
                              ("model.text.path", out.text.kind == "hf", out.text.path),
                              ("model.predictor.path", out.predictor.kind == "hf_lm", out.predictor.path)]:
        local = resolve_text_path(path) if key == "model.text.path" else path
        if needed and not Path(local).is_dir():
            raise ConfigError(f"{key} '{path}' is not a local folder and has no shipped architecture "
                              f"({sorted(SHIPPED_ARCHITECTURES)}); point it at a local copy of the model")
    return out
