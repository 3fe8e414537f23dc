"""Shared fixtures: the analytic noise model for Gaussian data, and real CIFAR-10 images."""

from __future__ import annotations

import io
import logging
import os
import tarfile
import uuid

import numpy as np
import pytest
import torch

from diffusion import NoiseSchedule
from helpers import SHARED_CIFAR, cifar_subset_folder, free_port

# boto3 must never probe the EC2 metadata address for credentials from a test.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


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


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) really listening on 127.0.0.1 for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Environment pointing at the test S3 server, and a fresh bucket; yields the bucket name."""
    import boto3

    env = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = f"bucket-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) shared by the tests that need it."""
    import ray

    ray.init(address="local", num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cifar_shards(tmp_path_factory):
    """A real CIFAR-10 subset (100 train + 20 test images per class) prepared as shards."""
    if not SHARED_CIFAR.exists():
        pytest.skip(f"real-data check skipped: {SHARED_CIFAR} is absent (it exists on developer machines and CI)")
    from diffusion.data import imagefolder_source, open_location, write_shards

    root = tmp_path_factory.mktemp("cifar-subset")
    folder = cifar_subset_folder(root / "images", {"train": 100, "test": 20})
    write_shards(imagefolder_source(folder, None, None), open_location(str(root / "shards")), quiet=True)
    return str(root / "shards")


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """A randomly initialised FID Inception weights file (labelled: not the real weights)."""
    from helpers import random_fid_inception

    return random_fid_inception(tmp_path_factory.mktemp("inception") / "random-init-fid-inception-NOT-REAL.pth")
