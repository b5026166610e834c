"""Batched encoding with a model: images -> visual tokens, texts -> Y features or target embeddings.

Training and evaluation share these helpers, so both read images and clips the same way
(``vljepa.data.transforms.visual_pixels`` with ``on_error``) and both reuse the on-disk cache of frozen-tower outputs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Sequence

import torch

from vljepa.data.cache import EmbeddingCache, file_items
from vljepa.data.formats import SkipReport
from vljepa.data.transforms import image_transform, unreadable, visual_pixels
from vljepa.models.vljepa import VLJepa


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (read from /proc/cpuinfo; False where that file does not exist)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it does not exist); read once, since
    ``autocast("auto")`` asks on every batch."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16`, else ``no``; other values unchanged."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "no"
    return precision


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast on the model's device (``auto`` as :func:`resolve_precision`), or nothing."""
    precision = resolve_precision(precision, device)
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext()


def pixel_loader(model: VLJepa):
    """PIL image -> normalised tensor for this model's X-encoder."""
    return image_transform(model.config.vision.image_size, model.vision.mean, model.vision.std)


def load_pixels(
    paths: Sequence[str], model: VLJepa, *, on_error: str, report: SkipReport
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load and preprocess images or clips -> (pixels [N, 3, H, W], or [N, T, 3, H, W] for a video
    encoder of T = num_frames frames; ok [N] bool); bad files follow on_error."""
    to_tensor = pixel_loader(model)
    size, frames = model.config.vision.image_size, model.config.vision.num_frames
    pixels = torch.zeros(len(paths), *((frames,) if frames > 1 else ()), 3, size, size)
    ok = torch.zeros(len(paths), dtype=torch.bool)
    for i, p in enumerate(paths):
        x = visual_pixels(p, to_tensor, num_frames=frames, on_error=on_error)
        if x is None:
            report.add(unreadable(p), p)
            continue
        pixels[i] = x
        ok[i] = True
    return pixels, ok


CPU_VISION_CHUNK = 32  # images per call of the vision tower on the CPU (see encode_images)


@torch.no_grad()
def encode_images(
    model: VLJepa,
    paths: Sequence[str],
    *,
    batch_size: int = 128,
    on_error: str = "stop",
    report: SkipReport | None = None,
    precision: str = "no",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual tokens ``[N, Ntok, Dv]`` (float32, CPU) and ``ok`` ``[N]`` for image files."""
    report = report if report is not None else SkipReport()
    device = model.device
    chunks, oks = [], []
    for start in range(0, len(paths), batch_size):
        pixels, ok = load_pixels(paths[start : start + batch_size], model, on_error=on_error, report=report)
        # On the CPU the tower runs in small chunks whose activations stay in cache, which is faster per
        # image than one large batch (benchmarks/bench_quickstart.py measures both).
        step = CPU_VISION_CHUNK if device.type == "cpu" else len(pixels)
        for s in range(0, len(pixels), max(1, step)):
            with autocast(precision, device):
                tokens = model.vision(pixels[s : s + step].to(device))
            chunks.append(tokens.float().cpu())
        oks.append(ok)
    if not chunks:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    return torch.cat(chunks), torch.cat(oks)


CPU_TEXT_CHUNK = 64  # texts per call of the Y-encoder on the CPU


def text_batch_size(batch_size: int, device: torch.device) -> int:
    """Texts per Y-encoder call: on the CPU at most ``CPU_TEXT_CHUNK``, where smaller batches of
    length-sorted texts run faster per text than large ones."""
    return max(1, min(batch_size, CPU_TEXT_CHUNK)) if device.type == "cpu" else batch_size


@torch.no_grad()
def encode_text_features(
    model: VLJepa, texts: Sequence[str], *, batch_size: int = 256, with_states: bool = False, precision: str = "no",
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Y-encoder outputs for ``texts``: ``pooled`` [N, H] and, with states, flat token states
    (texts tokenised to at most ``max_length`` tokens; default: the Y-encoder's own limit).

    Token states are stored flat (``states`` [sum of lengths, H], ``offsets`` [N + 1]) so short
    texts do not pay for the longest one. Texts are encoded in length order to cut padding.
    """
    device = model.device
    batch_size = text_batch_size(batch_size, device)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    pooled = torch.zeros(len(texts), model.text.pooled_size)
    per_text: list[torch.Tensor | None] = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        tok = model.tokenize([texts[i] for i in idx], max_length=max_length)
        with autocast(precision, device):
            enc = model.text(tok["input_ids"].to(device), tok["attention_mask"].to(device))
        pooled[idx] = enc.pooled.float().cpu()
        if with_states:
            lengths = tok["attention_mask"].sum(1).tolist()
            states = enc.states.float().cpu()
            for row, (i, n) in enumerate(zip(idx, lengths)):
                per_text[i] = states[row, :n].clone()
    out = {"pooled": pooled}
    if with_states:
        lengths = torch.tensor([t.shape[0] for t in per_text])
        out["states"] = torch.cat(per_text) if per_text else torch.zeros(0, model.text.hidden_size)
        out["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return out


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's tensors: two encoders with one name but other weights (a random
    initialisation, a fine-tuned copy) never share cache entries."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cached_image_tokens(
    model: VLJepa, paths: Sequence[str], cache: EmbeddingCache | None, *, on_error: str, report: SkipReport,
    precision: str = "no", batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``encode_images`` through the cache: (tokens, ok, hit). Skipped images are recorded in the cache too."""

    def compute():
        tokens, ok = encode_images(model, paths, batch_size=batch_size, on_error=on_error, report=report,
                                   precision=precision)
        return {"tokens": tokens, "ok": ok}, {}

    if cache is None:
        out, hit = compute()[0], False
    else:
        identity = {"vision": model.vision.identity(), "weights": weights_digest(model.vision),
                    "mean": list(model.vision.mean), "std": list(model.vision.std), "precision": precision,
                    "on_error": on_error}
        out, hit = cache.get_or_compute(identity, paths, compute, key_items=file_items(paths))
        if hit:
            for p, good in zip(paths, out["ok"].tolist()):
                if not good:
                    report.add(unreadable(p), p)
    return out["tokens"], out["ok"].bool(), hit


def cached_text_features(
    model: VLJepa, texts: Sequence[str], cache: EmbeddingCache | None, *, with_states: bool,
    precision: str = "no", batch_size: int = 256, max_length: int | None = None,
) -> tuple[dict[str, torch.Tensor], bool]:
    """``encode_text_features`` through the cache: (features, hit)."""

    def compute():
        feats = encode_text_features(model, texts, batch_size=batch_size, with_states=with_states,
                                     precision=precision, max_length=max_length)
        whole = {k: feats.pop(k) for k in ("states", "offsets") if k in feats}
        return feats, whole

    if cache is None:
        sharded, whole = compute()
        return {**sharded, **whole}, False
    identity = {"text": model.text.identity(), "weights": weights_digest(model.text), "states": with_states,
                "precision": precision, "max_length": max_length}
    return cache.get_or_compute(identity, texts, compute)


@torch.no_grad()
def embed_texts(model: VLJepa, texts: Sequence[str], *, batch_size: int = 256, precision: str = "no") -> torch.Tensor:
    """Target-space embeddings ``[N, D]`` for texts (Y + target head), L2-normalised.

    Texts are embedded in length order (less padding) and returned in the order given."""
    device = model.device
    if not texts:
        return torch.zeros(0, model.config.embed_dim)
    batch_size = text_batch_size(batch_size, device)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with autocast(precision, device):
        chunks = [model.encode_text([texts[i] for i in order[s : s + batch_size]]).float().cpu()
                  for s in range(0, len(order), batch_size)]
    return torch.cat(chunks)[torch.argsort(torch.tensor(order))]


@torch.no_grad()
def predict_batched(
    model: VLJepa, visual_tokens: torch.Tensor, image_index: Sequence[int], queries: Sequence[str],
    *, batch_size: int = 256, precision: str = "no",
) -> torch.Tensor:
    """Predicted embeddings ``[M, D]`` for (image, query) pairs over precomputed visual tokens."""
    device = model.device
    out = []
    for s in range(0, len(image_index), batch_size):
        idx = torch.tensor(image_index[s : s + batch_size], dtype=torch.long)
        q = model.tokenize_queries(list(queries[s : s + batch_size]))
        q = {} if q is None else {k: v.to(device) for k, v in q.items()}
        with autocast(precision, device):
            out.append(model.predict(visual_tokens=visual_tokens[idx].to(device), **q).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)
