"""Shared fixtures: the analytic noise model for Gaussian data, and real CIFAR-10 images."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion import NoiseSchedule

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


class GaussianOracle:
    """The optimal noise predictor for data x_0 ~ N(mu, s^2 I):
    E[eps | x_t] = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t)."""

    def __init__(self, betas: torch.Tensor, mu: float, s: float):
        self.abar = NoiseSchedule(betas).alphas_cumprod
        self.mu, self.s = mu, s

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x_t.shape[0],) and t.dtype == torch.long
        abar = self.abar[t].to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * self.mu) / (abar * self.s**2 + 1 - abar)


@pytest.fixture
def oracle():
    return GaussianOracle


@pytest.fixture
def cifar():
    return load_cifar


def load_cifar(split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `per_class` images of each class of a split of the shared CIFAR-10 JPEG
    copy, as uint8 (N, 3, 32, 32) and int64 labels; skips the test where it is absent."""
    if not SHARED_CIFAR.exists():
        pytest.skip(f"real-data check skipped: {SHARED_CIFAR} is absent (it exists on developer machines and CI)")
    from PIL import Image

    images, labels, counts, classes = [], [], {}, {}
    with tarfile.open(SHARED_CIFAR, "r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] != split:
                continue
            label = classes.setdefault(parts[1], len(classes))
            if counts.get(label, 0) >= per_class:
                continue
            counts[label] = counts.get(label, 0) + 1
            image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
            images.append(np.asarray(image))
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels)
