"""Zero-shot classification: class embeddings from prompt templates, top-k accuracy.

Each class is represented by the text encoder's embedding of prompts such as "a photo of a {}.",
averaged over templates (the CLIP recipe); an image is assigned the class with the most similar
embedding. As in retrieval, ties are broken against the model, so a collapsed model scores 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from vljepa.decode.nearest import encoded


def class_embeddings(
    classnames: Sequence[str],
    templates: Sequence[str],
    encode: Callable[[list[str]], torch.Tensor],
) -> torch.Tensor:
    """One embedding per class: ``[C, D]``, L2-normalised.

    Every ``{}`` in a template is replaced by the class name. The prompt embeddings of a class
    are L2-normalised, averaged over templates and normalised again, so each template weighs the
    same whatever the norm the encoder gives it. ``encode`` is called once per class, with that
    class's ``len(templates)`` prompts, under ``torch.no_grad()``.
    """
    if isinstance(classnames, str) or isinstance(templates, str):
        raise TypeError("classnames and templates must be lists of strings, not a single string")
    if not classnames:
        raise ValueError("no class names given")
    if not templates:
        raise ValueError('no templates given; use ["{}"] to embed the bare class names')
    for template in templates:
        if "{}" not in template:
            raise ValueError(
                f'template {template!r} has no "{{}}" for the class name, e.g. "a photo of a {{}}."'
            )
    out = []
    with torch.no_grad():
        for name in classnames:
            prompts = [template.replace("{}", name) for template in templates]
            emb = encoded(encode, prompts, "prompts")
            out.append(F.normalize(emb.detach().float(), dim=-1).mean(dim=0))
    return F.normalize(torch.stack(out), dim=-1)


def classification_metrics(
    image_emb: torch.Tensor,
    class_emb: torch.Tensor,
    labels: Sequence[int],
    *,
    ks: Sequence[int] = (1, 5),
    classnames: Sequence[str] | None = None,
    batch_size: int = 4096,
) -> dict[str, float | dict[str, float]]:
    """Top-k accuracy of cosine-similarity classification.

    Args:
        image_emb: ``[N, D]`` image embeddings.
        class_emb: ``[C, D]`` class embeddings (see :func:`class_embeddings`).
        labels: the true class index of each image.
        ks: the k of each ``top{k}`` key; a k larger than C is clipped to C (the key keeps k).
        classnames: if given (length C), adds ``per_class_top1``: class name -> top-1 accuracy,
            for the classes that have at least one image.
        batch_size: images scored at a time.

    Returns:
        ``top{k}`` for each k (fractions in [0, 1]), ``n`` (number of images) and, with
        ``classnames``, ``per_class_top1``.
    """
    if image_emb.dim() != 2 or class_emb.dim() != 2 or image_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(
            f"image_emb [N, D] and class_emb [C, D] must share D, got {tuple(image_emb.shape)} "
            f"and {tuple(class_emb.shape)}"
        )
    n, n_classes = image_emb.shape[0], class_emb.shape[0]
    if n == 0 or n_classes == 0:
        raise ValueError(f"need at least one image and one class, got {n} and {n_classes}")
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")
    if classnames is not None:
        if len(classnames) != n_classes:
            raise ValueError(f"{len(classnames)} classnames for {n_classes} class embeddings")
        if len(set(classnames)) != n_classes:
            raise ValueError("classnames must be unique: they key per_class_top1")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got ks={tuple(ks)}")
    for name, x in (("image_emb", image_emb), ("class_emb", class_emb)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    images = F.normalize(image_emb.detach().float(), dim=-1)
    classes = F.normalize(class_emb.detach().float().to(images.device), dim=-1)
    target = torch.as_tensor(list(labels), dtype=torch.long, device=images.device)
    if bool(((target < 0) | (target >= n_classes)).any()):
        bad = int(target[(target < 0) | (target >= n_classes)][0])
        raise ValueError(f"label {bad} is outside [0, {n_classes})")

    # 0-based rank of the true class: how many other classes score at least as high.
    ranks = []
    for start in range(0, n, batch_size):
        sims = images[start : start + batch_size] @ classes.T  # [b, C]
        true = sims.gather(1, target[start : start + batch_size, None])
        ranks.append((sims >= true).sum(dim=1) - 1)
    rank = torch.cat(ranks)

    metrics: dict[str, float | dict[str, float]] = {
        f"top{k}": (rank < min(k, n_classes)).double().mean().item() for k in ks
    }
    metrics["n"] = n
    if classnames is not None:
        correct = (rank == 0).double()
        counts = torch.bincount(target, minlength=n_classes)
        hits = torch.bincount(target, weights=correct, minlength=n_classes)
        metrics["per_class_top1"] = {
            name: (hits[c] / counts[c]).item()
            for c, name in enumerate(classnames)
            if counts[c] > 0
        }
    return metrics
