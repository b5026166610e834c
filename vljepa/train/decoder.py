"""Training a light text decoder on a saved model's target embeddings of captions.

The captions of a split are embedded once by the model's frozen Y-encoder and target head
(``embed_texts`` -> ``model.encode_text``). Each step draws a batch of captions, adds Gaussian
noise of a random norm in ``[0, noise_std]`` to their normalised embeddings (renormalised after),
so the decoder reads exact target embeddings and also the nearby *predicted* ones, and minimises
the decoder's next-token cross-entropy. The decoder is
written into the model folder as ``decoder/`` (:func:`vljepa.hub.write_decoder`), together with
the run's ``train_config.yaml`` and ``train_log.jsonl`` (one record per ``log_every`` steps).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from vljepa.config import ConfigError, DecoderTrainConfig, to_dict
from vljepa.data.readers import read_split
from vljepa.embed import embed_texts
from vljepa.hub import write_decoder
from vljepa.models.decoder import TextDecoder, build_decoder, caption_vocab
from vljepa.models.vljepa import VLJepa
from vljepa.train.optim import build_optimizer, build_scheduler


@dataclass
class DecoderTrainResult:
    """What :func:`train_decoder` returns."""

    decoder_dir: Path  # the model folder's decoder/
    steps: int
    seconds: float
    last: dict  # the last logged record (step, loss, lr, seconds)
    n_captions: int  # distinct training captions
    skipped: dict  # records skipped under on_error=skip, by reason


def noisy(embeddings: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``normalize(e + u n)`` per row: ``n ~ N(0, 1 / D)`` per dimension (``|n|`` is about 1) and ``u``
    uniform in ``[0, std]``, so the decoder sees clean embeddings as well as noisy ones."""
    if std == 0:
        return embeddings
    b, d = embeddings.shape
    scale = torch.rand(b, 1, generator=generator, device=embeddings.device) * std
    noise = torch.randn(b, d, generator=generator, device=embeddings.device) / math.sqrt(d)
    return F.normalize(embeddings + scale * noise, dim=-1)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fit_decoder(decoder: TextDecoder, texts: list[str], targets: torch.Tensor, cfg: DecoderTrainConfig) -> list[dict]:
    """Train ``decoder`` in place on (target embedding, caption) pairs; returns the logged records.

    ``targets`` ``[N, D]`` are the normalised target embeddings of ``texts``.
    """
    if cfg.batch_size < 1 or cfg.max_steps < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} and max_steps={cfg.max_steps} must both be at least 1")
    if cfg.noise_std < 0:
        raise ConfigError(f"noise_std={cfg.noise_std} must be >= 0")
    device = next(decoder.parameters()).device
    if decoder.cfg.whiten_eps > 0:
        decoder.set_whitening(targets.to(device), decoder.cfg.whiten_eps)
    enc = decoder.encode_texts(texts)
    ids, mask, targets = enc["input_ids"].to(device), enc["attention_mask"].to(device), targets.to(device)
    optimizer = build_optimizer(decoder, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.max_steps)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    order = torch.randperm(len(texts), generator=gen, device=device)
    pos, log = 0, []
    bar = tqdm(total=cfg.max_steps, disable=not cfg.progress, desc="train-decoder", dynamic_ncols=True)
    decoder.train()
    start = time.time()
    for step in range(1, cfg.max_steps + 1):
        if pos + cfg.batch_size > len(order):  # a new epoch: a fresh order, every batch full
            order, pos = torch.randperm(len(texts), generator=gen, device=device), 0
        rows = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        length = int(mask[rows].sum(1).max())
        loss = decoder.loss(noisy(targets[rows], cfg.noise_std, gen), ids[rows, :length], mask[rows, :length])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"decoder loss is {loss.item()} at step {step}; lower optim.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            log.append({"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                        "seconds": time.time() - start})
            bar.set_postfix(loss=f"{log[-1]['loss']:.3f}")
    bar.close()
    return log


def train_decoder(model_dir: str | Path, cfg: DecoderTrainConfig) -> DecoderTrainResult:
    """Train a light decoder for the model saved in ``model_dir`` on the captions of ``cfg.data``
    and write it to ``model_dir/decoder/`` (replacing any decoder there)."""
    start = time.time()
    if not cfg.data:
        raise ConfigError("train-decoder needs a caption split: pass --data SPLIT (a folder with metadata.jsonl)")
    model_dir = Path(model_dir)
    model = VLJepa.from_pretrained(model_dir)
    device = _device(cfg.device)
    model.to(device)
    records, skipped = read_split(cfg.data, "caption", on_error=cfg.on_error)
    texts = list(dict.fromkeys(c for r in records for c in r.captions))
    if not texts:
        raise ConfigError(f"split '{cfg.data}' has no captions to train a decoder on")
    torch.manual_seed(cfg.seed)
    targets = embed_texts(model, texts)
    tokenizer = model.text.tokenizer
    decoder = build_decoder(cfg.decoder, embed_dim=model.config.embed_dim, tokenizer=tokenizer,
                            vocab=caption_vocab(tokenizer, texts) if cfg.decoder.kind == "transformer" else None)
    decoder.to(device)
    trainable = sum(p.numel() for p in decoder.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in decoder.parameters() if not p.requires_grad)
    print(f"decoder {cfg.decoder.kind}: trainable {trainable / 1e6:.2f}M / frozen {frozen / 1e6:.2f}M | "
          f"{len(texts)} distinct captions | {skipped.summary()}", flush=True)
    log = fit_decoder(decoder, texts, targets, cfg)
    decoder.cpu().eval()
    files = {"train_config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False),
             "train_log.jsonl": "".join(json.dumps(r) + "\n" for r in log)}
    out = write_decoder(decoder, model_dir / "decoder", trained_on=str(Path(cfg.data).resolve()), files=files)
    return DecoderTrainResult(out, cfg.max_steps, time.time() - start, log[-1], len(texts), skipped.to_dict())
