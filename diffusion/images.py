"""Conversions between model tensors in [-1, 1] and 8-bit images, and PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    """(B, C, H, W) floats in [-1, 1] -> uint8 in [0, 255], rounded to the nearest level."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).byte()


def from_uint8(x: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1], the scaling of DDPM section 3.3."""
    return x.float() / 127.5 - 1


def save_grid(x: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write (B, C, H, W) images in [-1, 1] as one PNG grid (nrow per row, square by default)."""
    from torchvision.utils import save_image  # torchvision is needed only to write images

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or math.ceil(math.sqrt(x.shape[0]))
    save_image(to_uint8(x).float() / 255, path, nrow=nrow, padding=2)
    return path
