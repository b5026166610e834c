"""VLJepa: X-encoder + predictor + Y-encoder + target head, and its save / load.

    image ──► X ──► visual tokens ─┐
    query ──► query tokens ────────┴─► predictor ──► ŝ  [B, D]
    answer ─► Y ──► target head ───────────────────► s  [B, D]      loss = InfoNCE(ŝ, s)

Both ``ŝ`` and ``s`` are L2-normalised. Inference needs only X and the predictor; Y and the
head turn candidate texts into the same space for nearest-neighbour decoding. Y is frozen by
default; with LoRA adapters or ``text.freeze=false`` it runs with a graph and is trained.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vljepa.config import ConfigError, ModelConfig, config_dir, from_dict, to_dict
from vljepa.losses import (first_occurrence, gather_no_grad, gather_with_grad, info_nce, regression_loss,
                           target_spread, target_uniformity)
from vljepa.models.predictor import (Block, HFLMPredictor, build_predictor, length_buckets, masked_mean,
                                     prefix_lengths, run_in_buckets)
from vljepa.models.text import build_text_encoder, resolve_text_path
from vljepa.models.vision import build_vision_encoder

FORMAT = "vljepa"
FORMAT_VERSION = 1


@dataclass
class VLJepaOutput:
    """What ``VLJepa.forward`` returns."""

    pred: torch.Tensor  # [B, D] predicted answer embeddings, L2-normalised
    target: torch.Tensor | None = None  # [B, D] target embeddings, L2-normalised
    loss: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class TargetHead(nn.Module):
    """Projects the Y-encoder's output into the shared space.

    ``linear`` and ``mlp`` read the pooled sentence embedding; ``token`` reads the token states;
    ``hybrid`` is ``token`` plus a linear map of the pooled embedding (``pooled_dim`` wide).
    Token states are read in groups of similar length (``max_length_buckets``; 1 = one padded batch).
    """

    max_length_buckets = 4

    def __init__(self, *, kind: str, text_dim: int, embed_dim: int, hidden: int, depth: int,
                 pooled_dim: int | None = None) -> None:
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.net = nn.Linear(text_dim, embed_dim)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        elif kind in ("token", "hybrid"):
            self.inp = nn.Linear(text_dim, hidden)
            self.blocks = nn.ModuleList(Block(dim=hidden, heads=max(1, hidden // 64), mlp_ratio=2.0, dropout=0.0)
                                        for _ in range(depth))
            self.norm = nn.LayerNorm(hidden)
            self.out = nn.Linear(hidden, embed_dim)
            if kind == "hybrid":
                self.skip = nn.Linear(pooled_dim or text_dim, embed_dim)
        else:
            raise ConfigError(f"unknown model.target_head '{kind}'; use linear, mlp, token or hybrid")

    @property
    def needs_states(self) -> bool:
        return self.kind in ("token", "hybrid")

    def forward(self, pooled: torch.Tensor | None, states: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind in ("linear", "mlp"):
            return self.net(pooled)
        lengths = prefix_lengths(mask) if self.max_length_buckets > 1 else None
        if lengths is None:
            z = self._read_states(states, mask)
        else:
            # Captions (up to ~30 tokens) and one-word answers (~3) share a batch: run them in groups
            # of similar length instead of padding every answer to the longest caption.
            groups = length_buckets(lengths, max_buckets=self.max_length_buckets)
            z = run_in_buckets(groups, lambda rows, n: self._read_states(states[rows, :n], mask[rows, :n]))
        return z + self.skip(pooled) if self.kind == "hybrid" else z

    def _read_states(self, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.inp(states)
        key_mask = None if mask is None else mask.bool()
        for block in self.blocks:
            x = block(x, key_mask)
        return self.out(masked_mean(self.norm(x), key_mask))


class VLJepa(nn.Module):
    """A vision-language JEPA. Build from a :class:`ModelConfig`, or load with ``from_pretrained``.

    ``load_weights=False`` builds every part from its config only (random weights; works under
    ``torch.device("meta")``); ``with_tokenizers=False`` also skips the tokenizers, for building a
    model only to count its parameters. ``text_source`` / ``predictor_source`` / ``vision_source``
    are the folders a saved model keeps the parts' architecture files in.

    Train / eval mode: each tower keeps a frozen base in eval mode itself (``TextEncoder.train``,
    ``VisionEncoder.train``), so ``model.train()`` is safe to call on the whole model.
    """

    def __init__(self, config: ModelConfig, *, load_weights: bool = True, text_source: str | None = None,
                 predictor_source: str | None = None, vision_source: str | None = None,
                 with_tokenizers: bool = True) -> None:
        super().__init__()
        self.config = config
        self.vision = build_vision_encoder(config.vision, load_weights=load_weights, source=vision_source)
        self.text = build_text_encoder(config.text, load_weights=load_weights, source=text_source,
                                       with_tokenizer=with_tokenizers)
        if self.target_needs_states(config) and self.text.state_size is None:
            raise ConfigError(f"model.target_head={config.target_head} reads the Y-encoder's token states, which this "
                              f"{config.text.kind} text tower does not expose; use model.target_head=linear or mlp")
        self.target_head = TargetHead(
            kind=config.target_head,
            text_dim=self.text.state_size if self.target_needs_states(config) else self.text.hidden_size,
            embed_dim=config.embed_dim, hidden=config.target_head_dim, depth=config.target_head_depth,
            pooled_dim=self.text.hidden_size,
        )
        n_visual = self.vision.num_tokens(config.vision.image_size)
        if config.predictor.kind == "transformer" and n_visual > config.predictor.max_visual_tokens:
            raise ConfigError(f"the X-encoder gives {n_visual} tokens per sample; set "
                              f"model.predictor.max_visual_tokens >= {n_visual}")
        self.predictor = build_predictor(
            config.predictor, visual_dim=self.vision.out_dim, target_dim=config.embed_dim,
            vocab_size=self.text.vocab_size, load_weights=load_weights, source=predictor_source,
            with_tokenizer=with_tokenizers, text_state_dim=self.text.state_size, text_word_dim=self.text.word_size,
        )
        # query_tokens=text with a frozen Y: each distinct query's token states, read once (token ids -> [L, H]).
        self._query_memo: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        init = math.log(1.0 / config.loss.temperature)
        self.logit_scale = nn.Parameter(torch.tensor(init), requires_grad=config.loss.learn_temperature)

    @staticmethod
    def target_needs_states(config: ModelConfig) -> bool:
        return config.target_head in ("token", "hybrid")

    # ------------------------------------------------------------------ summaries

    def parameter_summary(self) -> dict[str, dict[str, int]]:
        """Trainable and frozen parameter counts per part."""
        parts = {"vision": self.vision.parameters(), "predictor": self.predictor.parameters(),
                 "text": self.text.parameters(), "target_head": self.target_head.parameters(),
                 "temperature": iter([self.logit_scale])}
        out = {}
        for name, params in parts.items():
            params = list(params)
            out[name] = {"trainable": sum(p.numel() for p in params if p.requires_grad),
                         "frozen": sum(p.numel() for p in params if not p.requires_grad)}
        return out

    # ------------------------------------------------------------------ encoders

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``[B, N, Dv]`` from pixels ``[B, 3, H, W]``."""
        if self.vision.static:
            with torch.no_grad():
                return self.vision(pixel_values)
        return self.vision(pixel_values)

    def tokenize(self, texts: list[str], *, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenise target texts with the Y-encoder's tokenizer: ``input_ids`` / ``attention_mask`` ``[B, L]``."""
        return self.text.tokenize(list(texts), max_length=max_length)

    def tokenize_queries(self, queries: list[str]) -> dict[str, torch.Tensor] | None:
        """Query ids / mask ``[B, L]``, or None when every query is empty (query-free).

        Queries use the predictor's own tokenizer when it has one (hf_lm: the language model's),
        otherwise the Y-encoder's (the built-in predictor embeds Y's vocabulary).
        """
        if all(not q for q in queries):
            return None
        max_length = self.config.predictor.max_query_len
        if self.predictor.tokenizer is None:
            tok = self.tokenize(queries, max_length=max_length)
        else:
            tok = self.predictor.tokenizer(list(queries), padding=True, truncation=True, max_length=max_length,
                                           return_tensors="pt")
        return {"query_ids": tok["input_ids"], "query_mask": tok["attention_mask"]}

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The Y-encoder's raw outputs: ``pooled`` [B, H] and, if the head needs them, ``states``/``mask``."""
        if self.text.static:
            with torch.no_grad():
                enc = self.text(input_ids, attention_mask)
        else:
            enc = self.text(input_ids, attention_mask)
        out = {"pooled": enc.pooled}
        if self.target_head.needs_states:
            out.update(states=enc.states, mask=enc.mask)
        return out

    def embed_target(self, pooled: torch.Tensor | None = None, states: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """Y-encoder outputs -> target embeddings ``[B, D]`` (L2-normalised)."""
        dtype = self.target_head_dtype
        z = self.target_head(None if pooled is None else pooled.to(dtype),
                             None if states is None else states.to(dtype), mask)
        return F.normalize(z.float(), dim=-1)

    @property
    def target_head_dtype(self) -> torch.dtype:
        return next(self.target_head.parameters()).dtype

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Texts -> target-space embeddings ``[B, D]`` (L2-normalised)."""
        device = self.logit_scale.device
        tok = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        return self.embed_target(**self.text_features(tok["input_ids"], tok["attention_mask"]))

    def _apply(self, *args, **kwargs):
        if "_query_memo" in self.__dict__:  # remembered query states would stay on the old device / dtype
            self._query_memo.clear()
        return super()._apply(*args, **kwargs)

    QUERY_MEMO_SIZE = 100_000  # distinct queries remembered (a VQA set repeats its question templates)

    def query_states(self, query_ids: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
        """The Y-encoder's token states of the queries ``[B, L, H]`` (zeros at padding), without gradient.

        With a frozen Y-encoder the states of a query depend only on its tokens, so each distinct query
        is run through Y once and remembered (up to ``QUERY_MEMO_SIZE``, least recently used dropped).
        """
        mask = torch.ones_like(query_ids) if query_mask is None else query_mask
        if not self.text.static:
            with torch.no_grad():
                return self.text(query_ids, mask).states * mask[..., None]
        lengths = mask.sum(1).tolist()
        keys = [tuple(row[:n]) for row, n in zip(query_ids.tolist(), lengths)]
        todo = list(dict.fromkeys(k for k in keys if k and k not in self._query_memo))
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            rows = torch.tensor([first[k] for k in todo], device=query_ids.device)
            width = max(len(k) for k in todo)
            with torch.no_grad():
                states = self.text(query_ids[rows, :width], mask[rows, :width]).states
            for k, st in zip(todo, states):
                self._query_memo[k] = st[:len(k)].detach().clone()
        out = torch.zeros(*query_ids.shape, self.text.state_size, device=query_ids.device,
                          dtype=next(self.text.parameters()).dtype)
        for i, k in enumerate(keys):
            if k:  # a query-free row of a mixed batch stays zeros (and is masked out)
                out[i, :len(k)] = self._query_memo[k]
                self._query_memo.move_to_end(k)
        while len(self._query_memo) > self.QUERY_MEMO_SIZE:
            self._query_memo.popitem(last=False)
        return out

    def predict(
        self,
        pixel_values: torch.Tensor | None = None,
        *,
        visual_tokens: torch.Tensor | None = None,
        query_ids: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted answer embeddings ``[B, D]`` (L2-normalised) from pixels or cached tokens."""
        if visual_tokens is None:
            if pixel_values is None:
                raise ValueError("predict needs pixel_values or visual_tokens")
            visual_tokens = self.encode_image(pixel_values)
        dtype = next(self.predictor.parameters()).dtype
        extra = {}
        query_tokens = getattr(self.predictor, "query_tokens", "")
        if query_ids is not None and query_ids.shape[1] > 0:
            if query_tokens == "text":
                extra["query_states"] = self.query_states(query_ids, query_mask)
            elif query_tokens == "words":
                extra["query_states"] = self.text.word_embeddings(query_ids)
        z = self.predictor(visual_tokens.to(dtype), query_ids, query_mask, **extra)
        return F.normalize(z.float(), dim=-1)

    # ------------------------------------------------------------------ training step

    def forward(self, batch: dict[str, torch.Tensor], *, with_loss: bool = True) -> VLJepaOutput:
        """One training / evaluation step.

        batch: ``pixel_values`` [B, 3, H, W] or ``visual_tokens`` [B, N, Dv]; optional ``query_ids`` /
        ``query_mask`` [B, L]; the target as ``target_ids`` / ``target_mask`` [B, T] (run through Y)
        or cached Y outputs ``target_pooled`` [B, H] (+ ``target_states`` [B, T, H] / ``target_mask``);
        optional ``target_groups`` [B] int64 (same id = same answer text). ``with_loss=False`` returns
        only the embeddings (gradient caching computes the loss over several of these).
        """
        pred = self.predict(batch.get("pixel_values"), visual_tokens=batch.get("visual_tokens"),
                            query_ids=batch.get("query_ids"), query_mask=batch.get("query_mask"))
        groups = batch.get("target_groups")
        rows, expand = (None, None) if groups is None else first_occurrence(groups)

        def take(key: str) -> torch.Tensor | None:
            # Repeated answers ("yes") are embedded once: the head runs on distinct targets only.
            t = batch.get(key)
            return t if t is None or rows is None else t[rows]

        if "target_ids" in batch:
            feats = self.text_features(take("target_ids"), take("target_mask"))
        else:
            feats = {"pooled": take("target_pooled"), "states": take("target_states"), "mask": take("target_mask")}
        distinct = self.embed_target(**feats)
        target = distinct if expand is None else distinct[expand]
        if not with_loss:
            return VLJepaOutput(pred=pred, target=target)
        terms = self.loss_terms(pred, target, groups)
        if self.config.loss.target_spread > 0:
            # Over this process's distinct targets, against Y's own pooled embeddings of them (rows that
            # repeat a text without a group id have cosine 1 under both, so they add nothing).
            if feats.get("pooled") is None:
                raise ConfigError("model.loss.target_spread needs the Y-encoder's pooled embeddings of the targets")
            terms["spread"] = target_spread(distinct, feats["pooled"])
            terms["loss"] = terms["loss"] + self.config.loss.target_spread * terms["spread"]
        metrics = {k: float(v.detach()) for k, v in terms.items() if k != "loss"}
        return VLJepaOutput(pred=pred, target=target, loss=terms["loss"], metrics=metrics)

    def loss_terms(self, pred: torch.Tensor, target: torch.Tensor,
                   groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The configured loss over this process's embeddings (InfoNCE gathers every process's)."""
        loss_cfg = self.config.loss
        if loss_cfg.kind != "infonce":
            return regression_loss(pred, target, loss_cfg.kind)
        scale = self.logit_scale.exp().clamp(max=loss_cfg.max_logit_scale)
        all_target = gather_with_grad(target)
        all_groups = None if groups is None else gather_no_grad(groups)
        terms = info_nce(gather_with_grad(pred), all_target, scale, all_groups, t2p_weight=loss_cfg.t2p_weight)
        if loss_cfg.target_uniformity > 0:
            terms["uniformity"] = target_uniformity(all_target, all_groups)
            terms["loss"] = terms["loss"] + loss_cfg.target_uniformity * terms["uniformity"]
        terms["temperature"] = (1.0 / scale).detach()
        return terms

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json, model.safetensors and the Y-encoder's files; atomic (temp + rename)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(self.config)}
            (tmp / "config.json").write_text(json.dumps(meta, indent=2))
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            self.text.save_files(tmp / "text_encoder")
            self.vision.save_files(tmp / "vision_encoder")  # writes only for architectures from a folder / Hub
            if isinstance(self.predictor, HFLMPredictor):
                self.predictor.save_files(tmp / "predictor")
            (tmp / "README.md").write_text(model_card(self))
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
                folder.rename(old)
                tmp.rename(folder)
                shutil.rmtree(old)
            else:
                tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, map_location: str = "cpu") -> VLJepa:
        """Load a model saved by ``save_pretrained`` from a folder (or ``hf-hub:owner/name``)."""
        folder = resolve_model_folder(str(name_or_path))
        meta = read_model_meta(folder)
        config = from_dict(ModelConfig, meta["model"], prefix="model.")
        predictor, vision = folder / "predictor", folder / "vision_encoder"
        model = cls(config, load_weights=False, text_source=str(folder / "text_encoder"),
                    predictor_source=str(predictor) if predictor.is_dir() else None,
                    vision_source=str(vision) if vision.is_dir() else None)
        state = load_file(str(folder / "model.safetensors"), device=map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"'{folder}/model.safetensors' does not match its config.json: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        return model.eval()


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
            raise ConfigError(
                f"cannot fetch '{repo}' from the Hugging Face Hub ({exc.__class__.__name__}); offline, "
                "download it elsewhere and pass the local folder instead"
            ) from exc
    raise ConfigError(f"model '{name}' not found: give a folder written by save_pretrained or hf-hub:owner/name")


def read_model_meta(folder: Path) -> dict:
    """Read and check ``config.json`` of a saved model; the error says what a model folder holds."""
    cfg_file = folder / "config.json"
    expected = "config.json (format=vljepa), model.safetensors and text_encoder/"
    if not cfg_file.is_file():
        raise ConfigError(f"'{folder}' is not a vljepa model folder: no config.json (expected {expected})")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"'{cfg_file}' is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"'{folder}' is not a vljepa model folder: config.json lacks format=vljepa (expected {expected})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(f"'{folder}' was written by a newer vljepa (format {meta['format_version']}); upgrade vljepa")
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"'{folder}' has config.json but no model.safetensors (expected {expected})")
    return meta


def model_card(model: VLJepa) -> str:
    """A short model card: what the parts are and how to load the model."""
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
    An hf X-encoder, Y-encoder or hf_lm predictor given as any other Hub id is an error (building
    it would reach the network): point it at a local copy, where config.json (and modules.json) suffice.
    """
    out = copy.deepcopy(config)

    def local(name: str) -> str:
        return str(config_dir() / SHIPPED_ARCHITECTURES[name]) if name in SHIPPED_ARCHITECTURES else name

    out.vision.name = local(out.vision.name)
    out.text.path = local(out.text.path)
    out.predictor.path = local(out.predictor.path)
    if out.vision.kind == "hf" and not Path(out.vision.name).is_dir():
        raise ConfigError(f"model.vision.name '{out.vision.name}' is not a local folder and has no shipped "
                          f"architecture ({sorted(SHIPPED_ARCHITECTURES)}); point it at a local copy of the model")
    if out.text.kind == "hf" and not Path(resolve_text_path(out.text.path)).is_dir():
        raise ConfigError(f"model.text.path '{out.text.path}' is not a local folder and has no shipped architecture "
                          f"({sorted(SHIPPED_ARCHITECTURES)}); point it at a local copy of the model")
    if out.text.kind == "open_clip" and out.text.path.startswith("hf-hub:"):
        raise ConfigError(f"model.text.path '{out.text.path}' would be fetched from the Hub; use local-dir:FOLDER")
    if out.predictor.kind == "hf_lm" and not Path(out.predictor.path).is_dir():
        raise ConfigError(f"model.predictor.path '{out.predictor.path}' is not a local folder and has no shipped "
                          f"architecture ({sorted(SHIPPED_ARCHITECTURES)}); point it at a local copy of the model")
    return out
