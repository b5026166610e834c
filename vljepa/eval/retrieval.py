"""Image <-> text retrieval metrics over embeddings (recall@k, median and mean rank).

For VL-JEPA the image side is the predictor's query-free prediction and the text side is the
Y-encoder embedding of every unique caption of the evaluation split. A retrieved text is correct
when it *equals* a ground-truth caption of the image, so a caption shared by two images is a hit
for both.

Ties are broken against the model: a wrong candidate scoring exactly as high as the best correct
one ranks ahead of it. Otherwise a collapsed model that maps everything to one vector would score
a perfect recall.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def build_text_index(
    captions_per_image: Sequence[Sequence[str]],
) -> tuple[list[str], list[list[int]]]:
    """De-duplicate caption strings across images.

    Returns:
        ``(unique_texts, image_to_texts)``: the distinct captions in first-seen order, and for each
        image the indices (into ``unique_texts``) of its captions, each listed once.
    """
    row: dict[str, int] = {}
    image_to_texts = []
    for i, captions in enumerate(captions_per_image):
        if isinstance(captions, str):
            raise TypeError(
                f"captions of image {i} must be a list of strings, got the string {captions!r}"
            )
        hits = [row.setdefault(caption, len(row)) for caption in captions]
        image_to_texts.append(list(dict.fromkeys(hits)))
    return list(row), image_to_texts


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_to_texts: Sequence[Sequence[int]],
    *,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 1024,
) -> dict[str, float]:
    """Recall@k and ranks for image->text and text->image retrieval by cosine similarity.

    Args:
        image_emb: ``[N_img, D]`` image-side embeddings.
        text_emb: ``[N_txt, D]`` embeddings of the unique caption texts.
        image_to_texts: for image ``i``, the indices of the texts that are correct for it (see
            :func:`build_text_index`). Every image needs at least one text and every text must
            belong to at least one image.
        ks: the k of each ``R@k``.
        batch_size: query rows scored at a time; memory is about ``batch_size * N`` floats.

    Returns:
        ``i2t_R@k`` / ``t2i_R@k`` (fractions in [0, 1]) for each k, ``{i2t,t2i}_median_rank`` and
        ``{i2t,t2i}_mean_rank`` (1-based rank of the first correct item), ``n_images``, ``n_texts``.
        Image->text ranks each image's first correct text; text->image ranks, for each text, the
        first image that has it.
    """
    n_img, n_txt = _check_embeddings(image_emb, text_emb)
    if len(image_to_texts) != n_img:
        raise ValueError(f"image_to_texts has {len(image_to_texts)} entries for {n_img} images")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got ks={tuple(ks)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    text_to_images: list[list[int]] = [[] for _ in range(n_txt)]
    for i, texts in enumerate(image_to_texts):
        if not texts:
            raise ValueError(f"image {i} has no ground-truth text; every image needs at least one")
        for t in texts:
            if not 0 <= t < n_txt:
                raise ValueError(f"image {i} lists text index {t}, outside [0, {n_txt})")
            text_to_images[t].append(i)
    orphan = next((t for t, images in enumerate(text_to_images) if not images), None)
    if orphan is not None:
        raise ValueError(
            f"text {orphan} is not a caption of any image; pass only the split's caption texts"
        )

    images = F.normalize(image_emb.detach().float(), dim=-1)
    texts = F.normalize(text_emb.detach().float().to(images.device), dim=-1)
    # Each direction chunks over its own queries, so a query's scores all come from one matmul
    # row and "best correct" and "wrong ones at least as high" compare exactly equal numbers.
    ranks = {
        "i2t": _first_hit_ranks(images, texts, image_to_texts, batch_size),
        "t2i": _first_hit_ranks(texts, images, text_to_images, batch_size),
    }
    metrics: dict[str, float] = {}
    for direction, r in ranks.items():
        for k in ks:
            metrics[f"{direction}_R@{k}"] = (r <= k).double().mean().item()
        metrics[f"{direction}_median_rank"] = r.double().quantile(0.5).item()
        metrics[f"{direction}_mean_rank"] = r.double().mean().item()
    metrics["n_images"] = n_img
    metrics["n_texts"] = n_txt
    return metrics


def _first_hit_ranks(
    queries: torch.Tensor,
    keys: torch.Tensor,
    hits: Sequence[Sequence[int]],
    batch_size: int,
) -> torch.Tensor:
    """1-based rank of the best-scoring correct key for each (normalised) query: ``[N_q]``."""
    ranks = []
    for start in range(0, queries.shape[0], batch_size):
        sims = queries[start : start + batch_size] @ keys.T  # [b, N_keys]
        chunk_hits = hits[start : start + sims.shape[0]]
        rows = [r for r, h in enumerate(chunk_hits) for _ in h]
        cols = [c for h in chunk_hits for c in h]
        correct = torch.zeros_like(sims, dtype=torch.bool)
        correct[rows, cols] = True
        best = sims.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append(((sims >= best) & ~correct).sum(dim=1) + 1)
    return torch.cat(ranks)


def _check_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[int, int]:
    """Validate both ``[N, D]`` embedding matrices (same D); return ``(N_img, N_txt)``."""
    for name, x in (("image_emb", image_emb), ("text_emb", text_emb)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be [N, D], got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"image_emb has width {image_emb.shape[1]} but text_emb has {text_emb.shape[1]}; "
            "both must live in the same embedding space"
        )
    return image_emb.shape[0], text_emb.shape[0]
