"""Shared fixtures: the analytic noise model for Gaussian data, and real CIFAR-10 images."""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import uuid

import numpy as np
import pytest
import torch

from diffusion import NoiseSchedule
from helpers import SHARED_CIFAR, cifar_subset_folder, free_port

# boto3 must never probe the EC2 metadata address for credentials from a test.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
# The tests' Ray runs without token auth, so that the command lines they start can join it.
os.environ["RAY_AUTH_MODE"] = "disabled"
# Ray Train's controller polls its workers every 2 s by default and starts a preemption
# watcher; polled every 0.25 s, a tiny test fit ends about 3 s sooner (the fits are the same).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# The quick tier runs in pytest-xdist processes: each takes its share of the cores for torch, as
# oversubscribed threads (2 processes x 2 threads on 2 cores) slow both.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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
    """An S3-compatible server (moto) really listening on 127.0.0.1 for the whole session. Its
    address and (fake) credentials are in the environment from the start, so that the
    session's Ray workers, started from this process, see them too."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3(s3_server):
    """A fresh bucket on the test S3 server; yields its name."""
    import boto3

    bucket = f"bucket-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray instance (2 CPUs) shared by the tests that need it (its workers see the
    test S3 server's environment). No dashboard: no test asks it (the Jobs API is the stack's),
    and it costs CPU the whole session (idle: 0.056 cores with it, 0.039 without, Zen 4 EPYC)."""
    import ray

    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_local):
    """The address of the session's Ray, for command lines run by tests to join (RAY_ADDRESS=)
    instead of starting a Ray of their own."""
    return ray_local.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="session")
def new_mlflow_store(tmp_path_factory):
    """A function giving the URI of a new, empty sqlite MLflow store (mlflow.db) in a folder: a
    copy of one whose tables were made once this session (making them takes 1.7 s on a Zen 4
    EPYC, about 4 s on the slowest machine of CI's kind; copying the file 0.04 s)."""
    from mlflow.tracking import MlflowClient

    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{template}").search_experiments()  # makes the tables

    def new(folder) -> str:
        shutil.copyfile(template, f"{folder}/mlflow.db")
        return f"sqlite:///{folder}/mlflow.db"

    return new


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch, new_mlflow_store):
    """A new sqlite MLflow store for this test, also in this process's MLFLOW_TRACKING_URI."""
    uri = new_mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def cifar_shards(tmp_path_factory):
    """A real CIFAR-10 subset (100 train + 10 test images per class) prepared as shards."""
    if not SHARED_CIFAR.exists():
        pytest.skip(f"real-data check skipped: {SHARED_CIFAR} is absent (it exists on developer machines and CI)")
    from diffusion.platform.shards import write_shards
    from diffusion.platform.sources import imagefolder_source
    from diffusion.platform.storage import open_location

    root = tmp_path_factory.mktemp("cifar-subset")
    folder = cifar_subset_folder(root / "images", {"train": 100, "test": 10})
    write_shards(imagefolder_source(folder, None, None), open_location(str(root / "shards")), quiet=True)
    return str(root / "shards")


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """scikit-learn's 8x8 digits prepared as shards (1,437 train, 360 test images)."""
    from diffusion.platform.shards import write_shards
    from diffusion.platform.sources import digits_source
    from diffusion.platform.storage import open_location

    out = tmp_path_factory.mktemp("digits") / "shards"
    write_shards(digits_source(["train", "test"]), open_location(str(out)), quiet=True)
    return str(out)


@pytest.fixture(scope="session")
def trained_digits():
    """The run folder of the tests' trained digits model (tests/fixtures/digits-ci, written by
    tests/fixtures/make_digits_model.py; read only)."""
    from helpers import DIGITS_MODEL

    return str(DIGITS_MODEL)


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """A randomly initialised FID Inception weights file (labelled: not the real weights)."""
    from helpers import random_fid_inception

    return random_fid_inception(tmp_path_factory.mktemp("inception") / "random-init-fid-inception-NOT-REAL.pth")
