"""Image preprocessing: resize to the backbone's input size and normalise with its statistics;
images and clips as the pixels an X-encoder reads."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import functional as TF

from vljepa.data.formats import Clip
from vljepa.data.readers.common import OnError
from vljepa.data.readers.video import load_visual


def image_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalised tensor ``[3, image_size, image_size]``."""

    def apply(img: Image.Image) -> torch.Tensor:
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        return TF.normalize(TF.to_tensor(img), list(mean), list(std))

    return apply


def visual_pixels(
    item: str, transform: Callable[[Image.Image], torch.Tensor], *, num_frames: int = 1, on_error: OnError = "stop"
) -> torch.Tensor | None:
    """A record's ``image`` (an image path or a clip reference) as the pixels an X-encoder reads:
    ``[3, H, W]`` for ``num_frames == 1``, else ``[num_frames, 3, H, W]`` (a still image in every
    frame). An unreadable input raises :class:`DataError` (``on_error="stop"``) or gives None."""
    frames = load_visual(item, num_frames=num_frames, on_error=on_error)
    if frames is None:
        return None
    pixels = torch.stack([transform(f) for f in frames])  # [1 or T, 3, H, W]
    return pixels[0] if num_frames == 1 else pixels.expand(num_frames, -1, -1, -1)


def unreadable(item: str) -> str:
    """The skip reason for an input :func:`visual_pixels` could not read."""
    return "unreadable image" if Clip.parse(item) is None else "unreadable clip"
