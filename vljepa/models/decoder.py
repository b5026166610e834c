"""Light text decoders: a vector of the shared embedding space -> text, chosen by ``DECODERS``.

Both kinds whiten the (L2-normalised) embedding by the statistics of their training targets
(``decoder.whiten_eps``), read it as ``prefix_tokens`` input embeddings made by a small MLP,
followed by ``[BOS] w1 ... wn`` with causal self-attention, and are trained to predict
``w1 ... wn [EOS]`` (:meth:`TextDecoder.loss`).

- ``transformer``: a small causal transformer trained from scratch. It uses the Y-encoder's
  tokenizer, restricted to ``vocab`` (the token ids its training captions contain), so its
  embedding table and output layer cover only the words it can have learned.
- ``hf_lm``: a pretrained Hugging Face causal language model (``AutoModelForCausalLM``: Llama,
  Qwen2, GPT-2 families) with its own tokenizer and full vocabulary; the prefix MLP maps into its
  input-embedding width. ``freeze_lm=true`` trains only the prefix MLP.

Generation (:meth:`TextDecoder.generate`) is one batched beam search for both kinds; one beam is
greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vljepa.config import ConfigError, DecoderConfig, check_kind_keys
from vljepa.models.layers import Block


class TextDecoder(nn.Module):
    """Common part of the decoders: the prefix MLP, caption encoding, the loss and generation.

    A subclass sets ``tokenizer`` and implements :meth:`token_logits` and, if its decoder ids are
    not the tokenizer's ids, :meth:`to_decoder_ids` / :meth:`to_tokenizer_ids`.
    """

    config_keys: tuple[str, ...] = ()
    tokenizer: Any

    def __init__(self, *, cfg: DecoderConfig, embed_dim: int, width: int) -> None:
        super().__init__()
        if cfg.prefix_tokens < 1:
            raise ConfigError(f"decoder.prefix_tokens={cfg.prefix_tokens} must be at least 1")
        if cfg.max_length < 2:
            raise ConfigError(f"decoder.max_length={cfg.max_length} must be at least 2 (BOS and EOS)")
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.width = width
        self.prefix = nn.Sequential(nn.Linear(embed_dim, width), nn.GELU(),
                                    nn.Linear(width, cfg.prefix_tokens * width))
        # x -> (x - input_mean) @ input_transform before the prefix MLP; identity until set_whitening.
        self.register_buffer("input_mean", torch.zeros(embed_dim))
        self.register_buffer("input_transform", torch.eye(embed_dim))

    @torch.no_grad()
    def set_whitening(self, embeddings: torch.Tensor, eps: float) -> None:
        """Whiten inputs by the mean and covariance of ``embeddings`` ``[N, D]`` (ZCA, eigenvalues + ``eps``).

        Target embeddings spend most of their variance on a few directions; what tells word order
        and attribute binding apart lies in directions of small variance, which whitening brings to
        the same scale before the MLP reads them.
        """
        x = embeddings.detach().double()
        mean = x.mean(0)
        values, vectors = torch.linalg.eigh((x - mean).T @ (x - mean) / len(x))
        transform = vectors @ torch.diag((values.clamp_min(0) + eps).rsqrt()) @ vectors.T
        self.input_mean.copy_(mean.float())
        self.input_transform.copy_(transform.float())

    def _special_ids(self) -> None:
        """BOS / EOS in decoder ids: the tokenizer's BOS (else CLS) and EOS (else SEP)."""
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if bos is None or eos is None:
            raise ConfigError(f"tokenizer {type(tok).__name__} has no BOS/CLS or no EOS/SEP token; the decoder "
                              "needs both to start and end captions")
        self.bos_token_id, self.eos_token_id = bos, eos

    @property
    def bos_id(self) -> int:
        return self.to_decoder_ids([self.bos_token_id])[0]

    @property
    def eos_id(self) -> int:
        return self.to_decoder_ids([self.eos_token_id])[0]

    # ------------------------------------------------------------------ ids

    def to_decoder_ids(self, token_ids: Sequence[int]) -> list[int]:
        """Tokenizer ids -> the decoder's ids (the same for a decoder over the full vocabulary)."""
        return list(token_ids)

    def to_tokenizer_ids(self, ids: Sequence[int]) -> list[int]:
        """The decoder's ids -> tokenizer ids."""
        return list(ids)

    def encode_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` ``[B, T]`` in decoder ids: ``[BOS] w1 ... wn [EOS]``, right-padded.

        Captions longer than ``max_length`` tokens are cut (and then end without EOS).
        """
        words = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        seqs = [self.to_decoder_ids([self.bos_token_id, *w, self.eos_token_id])[: self.cfg.max_length]
                for w in words]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.eos_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), length, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode_ids(self, ids: Sequence[int]) -> str:
        """Decoder ids of one caption (without BOS, up to EOS) -> text."""
        return self.tokenizer.decode(self.to_tokenizer_ids(ids), skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ forward

    def prefix_embeds(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, D]`` -> prefix input embeddings ``[B, prefix_tokens, width]``."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"the decoder reads embeddings [B, {self.embed_dim}], got {list(embeddings.shape)}")
        x = (embeddings.float() - self.input_mean) @ self.input_transform
        dtype = self.prefix[0].weight.dtype
        return self.prefix(x.to(dtype)).view(len(embeddings), self.cfg.prefix_tokens, self.width)

    def token_logits(self, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, T, V]`` at each of ``ids`` ``[B, T]``, after the prefix ``[B, k, width]``."""
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, T, V]`` for ``ids`` ``[B, T]`` given embeddings ``[B, D]``."""
        return self.token_logits(self.prefix_embeds(embeddings), ids)

    def loss(self, embeddings: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of every caption token after BOS (EOS included), teacher-forced."""
        logits = self(embeddings, input_ids[:, :-1])
        keep = attention_mask[:, 1:].bool()
        return F.cross_entropy(logits[keep].float(), input_ids[:, 1:][keep])

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate_ids(self, embeddings: torch.Tensor, *, num_beams: int = 1,
                     max_length: int | None = None) -> list[list[int]]:
        """Beam search from each embedding ``[B, D]``; returns decoder ids without BOS and EOS.

        All rows of the batch and all beams run as one batch. A beam that has emitted EOS stays
        finished at its score; the search stops when every beam is finished or after
        ``max_length`` tokens (BOS and EOS counted). Beams are ranked by the sum of their token
        log-probabilities; ``num_beams=1`` is greedy decoding.
        """
        if num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {num_beams}")
        max_length = max_length or self.cfg.max_length
        if not 2 <= max_length <= self.cfg.max_length:
            raise ValueError(f"max_length must be in 2..{self.cfg.max_length} (decoder.max_length), got {max_length}")
        b, k = len(embeddings), num_beams
        if b == 0:
            return []
        prefix = self.prefix_embeds(embeddings.to(self.prefix[0].weight.device)).repeat_interleave(k, 0)
        ids = torch.full((b * k, 1), self.bos_id, dtype=torch.long, device=prefix.device)
        scores = torch.zeros(b, k, device=prefix.device)
        scores[:, 1:] = float("-inf")  # at the start only the first beam is live, so beams do not repeat
        done = torch.zeros(b * k, dtype=torch.bool, device=prefix.device)
        eos = self.eos_id
        for _ in range(max_length - 1):
            logp = F.log_softmax(self.token_logits(prefix, ids)[:, -1].float(), dim=-1)  # [B*K, V]
            vocab = logp.shape[-1]
            # A finished beam can only repeat EOS, at no cost: its score stays as it was.
            logp[done] = float("-inf")
            logp[done, eos] = 0.0
            top, flat = (scores.reshape(-1, 1) + logp).view(b, k * vocab).topk(k, dim=1)
            rows = (torch.arange(b, device=prefix.device)[:, None] * k + flat // vocab).reshape(-1)
            token = (flat % vocab).reshape(-1, 1)
            ids = torch.cat([ids[rows], token], dim=1)
            done = done[rows] | (token[:, 0] == eos)
            scores = top
            if bool(done.all()):
                break
        best = ids.view(b, k, -1)[torch.arange(b), scores.argmax(1)].tolist()
        out = []
        for seq in best:
            seq = seq[1:]
            out.append(seq[: seq.index(eos)] if eos in seq else seq)
        return out

    def generate(self, embeddings: torch.Tensor, *, num_beams: int = 1, max_length: int | None = None,
                 batch_size: int = 256) -> list[str]:
        """Captions for embeddings ``[B, D]`` (see :meth:`generate_ids`), in batches of ``batch_size``."""
        texts = []
        for s in range(0, len(embeddings), batch_size):
            ids = self.generate_ids(embeddings[s : s + batch_size], num_beams=num_beams, max_length=max_length)
            texts += [self.decode_ids(seq) for seq in ids]
        return texts

    # ------------------------------------------------------------------ saving

    def extra_meta(self) -> dict:
        """What besides the config rebuilds this decoder without its weights (saved in its config.json)."""
        return {}

    def save_files(self, folder: str | Path) -> None:
        """Write architecture files the weights do not carry (the hf_lm model's config and tokenizer)."""


class CausalBlock(Block):
    """The pre-norm transformer block with causal self-attention."""

    def attend(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(a.transpose(1, 2).reshape(b, n, d))


class TransformerDecoder(TextDecoder):
    """A causal transformer trained from scratch over the Y tokenizer's ids listed in ``vocab``.

    Right padding needs no mask: with causal attention a real token never sees a later pad.
    The output layer is tied to the token embedding table.
    """

    config_keys = ("prefix_tokens", "dim", "depth", "heads", "mlp_ratio", "mlp", "dropout", "max_length", "whiten_eps")

    def __init__(self, *, cfg: DecoderConfig, embed_dim: int, tokenizer: Any, vocab: Sequence[int]) -> None:
        super().__init__(cfg=cfg, embed_dim=embed_dim, width=cfg.dim)
        self.tokenizer = tokenizer
        self._special_ids()
        vocab = list(dict.fromkeys([self.bos_token_id, self.eos_token_id, *vocab]))
        self.vocab = vocab
        self._index = {t: i for i, t in enumerate(vocab)}
        self.token_embed = nn.Embedding(len(vocab), cfg.dim)
        self.pos = nn.Parameter(torch.randn(cfg.prefix_tokens + cfg.max_length, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(CausalBlock(dim=cfg.dim, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                                                dropout=cfg.dropout, mlp=cfg.mlp) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def to_decoder_ids(self, token_ids: Sequence[int]) -> list[int]:
        missing = [t for t in token_ids if t not in self._index]
        if missing:
            words = self.tokenizer.convert_ids_to_tokens(missing[:5])
            raise ValueError(f"tokens {words} are not in this decoder's vocabulary (the {len(self.vocab)} tokens of "
                             "its training captions); train the decoder on captions that contain them")
        return [self._index[t] for t in token_ids]

    def to_tokenizer_ids(self, ids: Sequence[int]) -> list[int]:
        return [self.vocab[i] for i in ids]

    def token_logits(self, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        k = prefix.shape[1]
        x = torch.cat([prefix, self.token_embed(ids)], dim=1)
        if x.shape[1] > self.pos.shape[0]:
            raise ValueError(f"{ids.shape[1]} tokens exceed decoder.max_length={self.cfg.max_length}")
        x = x + self.pos[: x.shape[1]]
        for block in self.blocks:
            x = block(x, None)
        return self.norm(x[:, k:]) @ self.token_embed.weight.T  # [B, T, V]

    def extra_meta(self) -> dict:
        return {"vocab": self.vocab}

    @classmethod
    def from_config(cls, cfg: DecoderConfig, *, embed_dim: int, tokenizer: Any = None,
                    vocab: Sequence[int] | None = None, load_weights: bool = True,
                    source: str | Path | None = None) -> TransformerDecoder:
        if tokenizer is None:
            raise ConfigError("decoder.kind=transformer uses the Y-encoder's tokenizer; pass the model's "
                              "text tokenizer (model.text.tokenizer)")
        if vocab is None:
            vocab = range(len(tokenizer))
        return cls(cfg=cfg, embed_dim=embed_dim, tokenizer=tokenizer, vocab=vocab)


class HFLMDecoder(TextDecoder):
    """A pretrained causal LM (``AutoModelForCausalLM``) reading a learned prefix before the caption tokens."""

    config_keys = ("path", "prefix_tokens", "max_length", "freeze_lm", "whiten_eps")

    def __init__(self, *, cfg: DecoderConfig, embed_dim: int, path: str, load_weights: bool = True) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        local = Path(path).is_dir()
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=local)
            if load_weights:
                lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=local, dtype=torch.float32)
            else:
                lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        except OSError as exc:
            raise ConfigError(f"cannot load causal language model '{path}' ({exc.__class__.__name__}). Offline, "
                              f"download it elsewhere (e.g. `hf download {path} --local-dir DIR`) and set "
                              "decoder.path=DIR") from exc
        except ValueError as exc:  # a config that AutoModelForCausalLM has no class for
            raise ConfigError(f"'{path}' is not a causal language model AutoModelForCausalLM can load ({exc}); "
                              "use a Llama, Qwen2 or GPT-2 family model") from exc
        super().__init__(cfg=cfg, embed_dim=embed_dim, width=lm.get_input_embeddings().embedding_dim)
        self.lm = lm
        self.tokenizer = tokenizer
        self._special_ids()
        if cfg.freeze_lm:
            self.lm.requires_grad_(False)

    def token_logits(self, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        k = prefix.shape[1]
        x = torch.cat([prefix, self.lm.get_input_embeddings()(ids).to(prefix.dtype)], dim=1)
        return self.lm(inputs_embeds=x, use_cache=False).logits[:, k:]

    def save_files(self, folder: str | Path) -> None:
        folder = Path(folder) / "lm"
        self.lm.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    @classmethod
    def from_config(cls, cfg: DecoderConfig, *, embed_dim: int, tokenizer: Any = None,
                    vocab: Sequence[int] | None = None, load_weights: bool = True,
                    source: str | Path | None = None) -> HFLMDecoder:
        """``source``: a saved decoder folder, whose ``lm/`` holds the model's config and tokenizer."""
        if source is not None:
            return cls(cfg=cfg, embed_dim=embed_dim, path=str(Path(source) / "lm"), load_weights=False)
        if not cfg.path:
            raise ConfigError("decoder.kind=hf_lm needs decoder.path: a causal language model folder or Hub id, "
                              "e.g. Qwen/Qwen2.5-0.5B")
        return cls(cfg=cfg, embed_dim=embed_dim, path=cfg.path, load_weights=load_weights)


DECODERS: dict[str, type[TextDecoder]] = {"transformer": TransformerDecoder, "hf_lm": HFLMDecoder}


def build_decoder(cfg: DecoderConfig, *, embed_dim: int, tokenizer: Any = None, vocab: Sequence[int] | None = None,
                  load_weights: bool = True, source: str | Path | None = None) -> TextDecoder:
    """Build the decoder named by ``cfg.kind`` for embeddings of ``embed_dim`` dimensions.

    ``tokenizer`` (transformer: the Y-encoder's) and ``vocab`` (transformer: the tokenizer ids it
    may emit; None = all) are ignored by hf_lm, which brings its own; ``source`` is a saved
    decoder folder (hf_lm: its ``lm/`` files); ``load_weights=False`` skips pretrained LM weights.
    """
    if cfg.kind not in DECODERS:
        raise ConfigError(f"unknown decoder.kind '{cfg.kind}'; choose one of {sorted(DECODERS)} (transformer: "
                          "trained from scratch; hf_lm: a pretrained causal language model, with decoder.path)")
    kind = DECODERS[cfg.kind]
    check_kind_keys(cfg, kind.config_keys, "decoder")
    return kind.from_config(cfg, embed_dim=embed_dim, tokenizer=tokenizer, vocab=vocab, load_weights=load_weights,
                            source=source)


def caption_vocab(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """The sorted distinct tokenizer ids of ``texts`` (the vocabulary of a transformer decoder trained on them)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return sorted({t for seq in ids for t in seq})
