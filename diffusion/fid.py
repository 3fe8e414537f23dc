"""FID and Inception Score with the standard FID InceptionV3 (TensorFlow's 2015-12-05 graph as
ported by pytorch-fid: `pt_inception-2015-12-05-6726825d.pth`).

- Features: images -> [0, 1] -> bilinear resize to 299x299 -> [-1, 1] -> the network's
  2048-d average-pool output (for FID) and its 1008 logits (for IS), as in pytorch-fid.
- FID (Heusel et al. 2017): ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), with the
  trace of the square root taken from the eigenvalues of S_1^(1/2) S_2 S_1^(1/2) in float64.
- IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over 10 splits.
- `FeatureStats` accumulates sums in float64, so statistics from many workers merge exactly.

The network's structure comes from pytorch-fid; its weights from a local file, the torch hub
cache or the official URL, in that order (`inception_weights`).
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
FEATURE_DIM = 2048


class MissingWeights(InputError, FileNotFoundError):
    """The FID Inception weights are not where they were looked for."""


def inception_weights(path: str | None = None, download: bool = True) -> Path:
    """The FID Inception weights: `path`, else $FID_INCEPTION_WEIGHTS, else the torch hub cache
    (downloading the official file there if it is absent and `download`)."""
    path = path or os.environ.get("FID_INCEPTION_WEIGHTS")
    if path:
        if not Path(path).is_file():
            raise MissingWeights(f"FID Inception weights {path} do not exist: {_where_to_put()}")
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    if cached.is_file():
        return cached
    if download:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(".part")
            with urllib.request.urlopen(WEIGHTS_URL, timeout=30) as response, open(partial, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
            partial.replace(cached)  # never a half-downloaded file under the real name
            return cached
        except OSError as e:
            raise MissingWeights(f"FID Inception weights could not be downloaded ({e}): {_where_to_put()}") from None
    raise MissingWeights(f"FID Inception weights not found: {_where_to_put()}")


def _where_to_put() -> str:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    return (
        f"download {WEIGHTS_URL} and put it at {cached}, or pass --inception-weights PATH "
        f"(or set FID_INCEPTION_WEIGHTS=PATH)"
    )


def build_fid_inception() -> nn.Module:
    """The FID InceptionV3 (torchvision's Inception3 with pytorch-fid's patched blocks), no weights."""
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    from torchvision.models.inception import Inception3

    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False, transform_input=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c = FIDInceptionC(768, 128), FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = FIDInceptionC(768, 160), FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
    return net


class InceptionFeatures(nn.Module):
    """uint8 images (N, H, W, C) -> (2048-d pool features, 1008 logits), both float64."""

    def __init__(self, weights: str | Path):
        super().__init__()
        net = build_fid_inception()
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.fc, net.fc = net.fc, nn.Identity()
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        device = self.fc.weight.device
        x = images.to(device).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        pool = self.net(2 * x - 1)
        return pool.double(), self.fc(pool).double()


class FeatureStats:
    """Running mean and covariance of feature vectors (float64 sums: exact to merge)."""

    def __init__(self, dim: int = FEATURE_DIM):
        self.n, self.sum, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, features: np.ndarray) -> "FeatureStats":
        features = np.asarray(features, dtype=np.float64)
        self.n += len(features)
        self.sum += features.sum(0)
        self.outer += features.T @ features
        return self

    @property
    def mu(self) -> np.ndarray:
        return self.sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        """The unbiased covariance (numpy's np.cov, as pytorch-fid uses)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        return (self.outer - self.n * np.outer(self.mu, self.mu)) / (self.n - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID)."""
    s1, s2 = torch.from_numpy(np.asarray(sigma1, np.float64)), torch.from_numpy(np.asarray(sigma2, np.float64))
    evals, evecs = torch.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
    inner = sqrt_s1 @ s2 @ sqrt_s1
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum().item()
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS from Inception logits (N, 1008): mean and std of exp(E KL(p(y|x) || p(y))) over splits."""
    log_p = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    scores = []
    for part in torch.chunk(log_p, splits):
        log_py = torch.logsumexp(part, 0) - np.log(len(part))
        scores.append(torch.exp((part.exp() * (part - log_py)).sum(1).mean()).item())
    return float(np.mean(scores)), float(np.std(scores))
