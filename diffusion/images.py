"""Conversions between model tensors in [-1, 1] and 8-bit images, and PNG grids."""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    """(B, C, H, W) floats in [-1, 1] -> uint8 in [0, 255], rounded to the nearest level."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).byte()


def from_uint8(x: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1], the scaling of DDPM section 3.3."""
    return x.float() / 127.5 - 1


def grid(x: Tensor, nrow: int | None = None) -> Tensor:
    """(B, C, H, W) images in [-1, 1] as one uint8 (H', W', C) grid, nrow per row (square by
    default), 2-pixel black borders."""
    from torchvision.utils import make_grid  # torchvision is needed only to lay out images

    nrow = nrow or math.ceil(math.sqrt(x.shape[0]))
    return make_grid(to_uint8(x).cpu(), nrow=nrow, padding=2).permute(1, 2, 0)


def save_grid(x: Tensor, path: str | Path | BinaryIO, nrow: int | None = None) -> Path | BinaryIO:
    """Write (B, C, H, W) images in [-1, 1] as one PNG grid (`grid`) to a file path or a binary file object."""
    from PIL import Image

    if isinstance(path, (str, Path)):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(x, nrow).squeeze(-1).numpy()).save(path, format="PNG")
    return path


def png(image) -> bytes:
    """One uint8 (H, W, C) image (a numpy array) as PNG bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.squeeze()).save(buf, format="PNG")
    return buf.getvalue()


def to_model_input(images: Tensor) -> Tensor:
    """The per-batch conversion, run where the batch lands (worker CPU or GPU): uint8
    (B, H, W, C) -> float32 (B, C, H, W) in [-1, 1] (a channels_last view)."""
    return from_uint8(images.permute(0, 3, 1, 2))


def random_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each (B, C, H, W) image flipped left-right with probability 1/2 (DDPM section 4, CIFAR-10)."""
    mask = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator) < 0.5
    return torch.where(mask, x.flip(3), x)
