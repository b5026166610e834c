"""Image preprocessing: resize to the backbone's input size and normalise with its statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import functional as TF


def image_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalised tensor ``[3, image_size, image_size]``."""

    def apply(img: Image.Image) -> torch.Tensor:
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        return TF.normalize(TF.to_tensor(img), list(mean), list(std))

    return apply
