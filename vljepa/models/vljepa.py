"""VLJepa: X-encoder + predictor + Y-encoder + target head.

    image ──► X ──► visual tokens ─┐
    query ──► query tokens ────────┴─► predictor ──► ŝ  [B, D]
    answer ─► Y ──► target head ───────────────────► s  [B, D]      loss = InfoNCE(ŝ, s)

Both ``ŝ`` and ``s`` are L2-normalised. Inference needs only X and the predictor; Y and the
head turn candidate texts into the same space for nearest-neighbour decoding. Y is frozen by
default; with LoRA adapters or ``text.freeze=false`` it runs with a graph and is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vljepa.config import ModelConfig
from vljepa.hub import load_model, save_model
from vljepa.losses import VLJepaLoss, first_occurrence, total_loss
from vljepa.models.grouping import run_grouped
from vljepa.models.heads import TargetHead
from vljepa.models.predictors import build_predictor
from vljepa.models.text import build_text_encoder
from vljepa.models.vision import build_vision_encoder


@dataclass
class VLJepaOutput:
    """What ``VLJepa.forward`` returns."""

    pred: torch.Tensor  # [B, D] predicted answer embeddings, L2-normalised
    target: torch.Tensor | None = None  # [B, D] target embeddings, L2-normalised
    loss: torch.Tensor | None = None  # the sum of the loss terms
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # every loss term and diagnostic, detached


class VLJepa(nn.Module):
    """A vision-language JEPA. Build from a :class:`ModelConfig`, or load with ``from_pretrained``.

    ``load_weights=False`` builds every part from its config only (random weights; works under
    ``torch.device("meta")``); ``with_tokenizers=False`` also skips the tokenizers, for building a
    model only to count its parameters. ``text_source`` / ``predictor_source`` / ``vision_source``
    are the folders a saved model keeps the parts' architecture files in.

    Each tower keeps a frozen base in eval mode itself, so ``model.train()`` is safe on the whole model.
    """

    # Rows of a batch run through the predictor and the target head in at most this many groups of
    # similar length (vljepa.models.grouping); 1 = one padded block. Same results either way.
    max_length_groups = 4

    def __init__(self, config: ModelConfig, *, load_weights: bool = True, text_source: str | None = None,
                 predictor_source: str | None = None, vision_source: str | None = None,
                 with_tokenizers: bool = True) -> None:
        super().__init__()
        self.config = config
        self.vision = build_vision_encoder(config.vision, load_weights=load_weights, source=vision_source)
        self.text = build_text_encoder(config.text, load_weights=load_weights, source=text_source,
                                       with_tokenizer=with_tokenizers)
        self.target_head = TargetHead(kind=config.target_head, pooled_dim=self.text.pooled_size,
                                      states_dim=self.text.hidden_size, embed_dim=config.embed_dim,
                                      hidden=config.target_head_dim, depth=config.target_head_depth)
        self.predictor = build_predictor(
            config.predictor, visual_dim=self.vision.out_dim, num_visual_tokens=self.vision.num_tokens(
                config.vision.image_size), target_dim=config.embed_dim, text_vocab_size=self.text.vocab_size,
            text_hidden_size=self.text.hidden_size, load_weights=load_weights, source=predictor_source,
            with_tokenizer=with_tokenizers, num_frames=1 if self.vision.native_video else config.vision.num_frames)
        self.criterion = VLJepaLoss(config.loss)
        # A light text decoder (vljepa.models.decoder), set by `vljepa train-decoder` / from_pretrained;
        # saved in its own folder, so it is not part of model.safetensors.
        self.decoder: nn.Module | None = None
        self.decoder_trained_on = ""  # the caption split the decoder was trained on

    @property
    def device(self) -> torch.device:
        return self.criterion.logit_scale.device

    def parameter_summary(self) -> dict[str, dict[str, int]]:
        """Trainable and frozen parameter counts per part."""
        parts = {"vision": self.vision, "predictor": self.predictor, "text": self.text,
                 "target_head": self.target_head, "temperature": self.criterion}
        if self.decoder is not None:
            parts["decoder"] = self.decoder
        return {name: {"trainable": sum(p.numel() for p in part.parameters() if p.requires_grad),
                       "frozen": sum(p.numel() for p in part.parameters() if not p.requires_grad)}
                for name, part in parts.items()}

    # ------------------------------------------------------------------ X side

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``[B, N, Dv]`` from pixels ``[B, 3, H, W]`` (or clips ``[B, T, 3, H, W]``)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.vision.static):
            return self.vision(pixel_values)

    def tokenize_queries(self, queries: list[str]) -> dict[str, torch.Tensor] | None:
        """Query ids / mask ``[B, L]``, or None when every query is empty (query-free).

        Queries use the predictor's own tokenizer when it has one (hf_lm: the language model's),
        otherwise the Y-encoder's.
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

    def query_states(self, query_ids: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
        """The Y-encoder's token states of the queries ``[B, L, H]`` (zeros at padding and in query-free
        rows), without gradient: what a predictor that ``reads_query_states`` reads."""
        mask = torch.ones_like(query_ids) if query_mask is None else query_mask
        rows = mask.any(1)
        if not rows.any():
            return torch.zeros(*query_ids.shape, self.text.hidden_size, device=query_ids.device)
        with torch.no_grad():
            states = self.text(query_ids[rows], mask[rows]).states * mask[rows, :, None]
        out = states.new_zeros(*query_ids.shape, states.shape[-1])
        out[rows] = states
        return out

    def predict(self, pixel_values: torch.Tensor | None = None, *, visual_tokens: torch.Tensor | None = None,
                query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
                query_states: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted answer embeddings ``[B, D]`` (L2-normalised) from pixels or cached visual tokens.

        ``query_states`` (the Y-encoder's token states of the queries) may come precomputed from the
        data pipeline; otherwise a predictor that reads them gets them from the Y-encoder here.
        """
        if visual_tokens is None:
            if pixel_values is None:
                raise ValueError("predict needs pixel_values or visual_tokens")
            visual_tokens = self.encode_image(pixel_values)
        visual_tokens = visual_tokens.to(next(self.predictor.parameters()).dtype)
        if query_ids is None or query_ids.shape[1] == 0:
            return F.normalize(self.predictor(visual_tokens).float(), dim=-1)
        if self.predictor.reads_query_states and query_states is None:
            query_states = self.query_states(query_ids, query_mask)
        query_mask = torch.ones_like(query_ids) if query_mask is None else query_mask

        def run(rows: torch.Tensor | slice, length: int) -> torch.Tensor:
            if length == 0:  # query-free rows (captions in a mixed batch)
                return self.predictor(visual_tokens[rows])
            states = None if query_states is None else query_states[rows, :length]
            return self.predictor(visual_tokens[rows], query_ids[rows, :length], query_mask[rows, :length], states)

        z = run_grouped(query_mask, run, base=visual_tokens.shape[1], max_groups=self.max_length_groups)
        return F.normalize(z.float(), dim=-1)

    # ------------------------------------------------------------------ Y side

    def tokenize(self, texts: list[str], *, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenise texts with the Y-encoder's tokenizer: ``input_ids`` / ``attention_mask`` ``[B, L]``."""
        return self.text.tokenize(list(texts), max_length=max_length)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The Y-encoder's raw outputs: ``pooled`` [B, H] and, if the head reads them, ``states``/``mask``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.text.static):
            enc = self.text(input_ids, attention_mask)
        out = {"pooled": enc.pooled}
        if self.target_head.reads_states:
            out.update(states=enc.states, mask=enc.mask)
        return out

    def embed_target(self, pooled: torch.Tensor | None = None, states: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """Y-encoder outputs -> target embeddings ``[B, D]`` (L2-normalised)."""
        dtype = next(self.target_head.parameters()).dtype
        pooled = None if pooled is None else pooled.to(dtype)
        if not self.target_head.reads_states:
            return F.normalize(self.target_head(pooled).float(), dim=-1)
        states = states.to(dtype)

        def run(rows: torch.Tensor | slice, length: int) -> torch.Tensor:
            return self.target_head(None if pooled is None else pooled[rows], states[rows, :length],
                                    None if mask is None else mask[rows, :length])

        z = run_grouped(mask, run, max_groups=self.max_length_groups) if mask is not None else run(
            slice(None), states.shape[1])
        return F.normalize(z.float(), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Texts -> target-space embeddings ``[B, D]`` (L2-normalised)."""
        tok = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        return self.embed_target(**self.text_features(tok["input_ids"], tok["attention_mask"]))

    # ------------------------------------------------------------------ training step

    def forward(self, batch: dict[str, torch.Tensor], *, with_loss: bool = True) -> VLJepaOutput:
        """One training / evaluation step.

        batch: ``pixel_values`` [B, 3, H, W] or ``visual_tokens`` [B, N, Dv]; optional ``query_ids`` /
        ``query_mask`` [B, L] (and ``query_states`` [B, L, H]); the target as ``target_ids`` /
        ``target_mask`` [B, T] (run through Y) or cached Y outputs ``target_pooled`` [B, H] (+
        ``target_states`` [B, T, H] / ``target_mask``); optional ``target_groups`` [B] int64 (same id =
        same answer text). ``with_loss=False`` returns only the embeddings (gradient caching computes
        the loss over several of these).
        """
        pred = self.predict(batch.get("pixel_values"), visual_tokens=batch.get("visual_tokens"),
                            query_ids=batch.get("query_ids"), query_mask=batch.get("query_mask"),
                            query_states=batch.get("query_states"))
        groups = batch.get("target_groups")
        # Repeated answers ("yes") are embedded once: the head runs on distinct targets only.
        rows, expand = (None, None) if groups is None else first_occurrence(groups)

        def take(key: str) -> torch.Tensor | None:
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
        terms = self.criterion(pred, target, groups)
        return VLJepaOutput(pred=pred, target=target, loss=total_loss(terms),
                            metrics={k: v.detach() for k, v in terms.items()})

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the model folder (see :mod:`vljepa.hub`); atomic, so an existing folder is replaced whole."""
        return save_model(self, folder)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, map_location: str = "cpu") -> VLJepa:
        """Load a model saved by ``save_pretrained`` from a folder (or ``hf-hub:owner/name``)."""
        return load_model(cls, name_or_path, map_location=map_location)
