"""The 8x8 digits as a prepared data set, their feature network (the FD-digits classifier,
cached beside the shards) and jobs/evaluate.py on them."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from diffusion.platform.settings import EXPERIMENT
from helpers import run_main, tiny_checkpoint

pytestmark = pytest.mark.timeout(900)


def test_prepare_digits_is_a_fixed_stratified_split_and_idempotent(tmp_path):
    from diffusion.platform.shards import ShardSet

    digits = tmp_path / "shards"
    proc = run_main("jobs/prepare_data.py", "--dataset", "digits", "--out", digits)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shards = ShardSet.open(str(digits))
    m = shards.manifest
    assert (m["dataset"], m["count"], m["splits"]) == ("digits", 1797, ["train", "test"])
    assert (m["height"], m["width"], m["channels"]) == (8, 8, 1)
    test = next(shards.iter_batches(2000, splits=["test"]))
    train = next(shards.iter_batches(2000, splits=["train"]))
    assert (len(test["label"]), len(train["label"])) == (360, 1437)
    assert set(np.bincount(test["label"])) <= {35, 36, 37}  # stratified: 36 per class, +-1
    assert not set(test["index"]) & set(train["index"])
    assert set(np.unique(train["image"])) <= {round(v * 255 / 16) for v in range(17)}  # 17 grey levels
    before = Path(digits, "manifest.json").read_bytes()
    again = run_main("jobs/prepare_data.py", "--dataset", "digits", "--out", digits)
    assert again.returncode == 0 and Path(digits, "manifest.json").read_bytes() == before


def test_digits_take_no_source(tmp_path):
    proc = run_main("jobs/prepare_data.py", "--dataset", "digits", "--source", "x.tar.gz", "--out", tmp_path / "d")
    assert proc.returncode == 2 and "--dataset digits comes with scikit-learn: it takes no --source" in proc.stderr


def test_the_classifier_is_deterministic_accurate_and_cached_beside_the_shards(digits_shards, capsys, monkeypatch):
    from diffusion import classifier
    from diffusion.classifier import DigitsClassifier, accuracy, train_classifier
    from diffusion.platform.evaluate import CLASSIFIER_FILE, classifier_judge
    from diffusion.platform.shards import ShardSet

    digits = digits_shards
    Path(digits, CLASSIFIER_FILE).unlink(missing_ok=True)  # made by another test of this session
    shards = ShardSet.open(digits)
    first = classifier_judge(shards)
    assert "training the FD classifier on 1437 train images" in capsys.readouterr().out
    cache = Path(digits, CLASSIFIER_FILE)
    assert cache.is_file() and not list(Path(digits).glob("*.partial"))
    again = classifier_judge(shards)
    assert capsys.readouterr().out == "" and again.sha256 == first.sha256  # from the cache

    train = next(shards.iter_batches(2000, splits=["train"]))
    images, labels = torch.from_numpy(train["image"]), torch.from_numpy(train["label"])
    once, twice = (train_classifier(images, labels, epochs=1) for _ in range(2))  # seeded: the same weights
    assert all(torch.equal(once["weights"][k], v) for k, v in twice["weights"].items())
    cached = torch.load(cache, weights_only=True)["state"]
    test = next(shards.iter_batches(2000, splits=["test"]))
    net = DigitsClassifier.from_state(cached)
    assert accuracy(net, torch.from_numpy(test["image"]), torch.from_numpy(test["label"])) >= 0.95  # measured 0.978

    # A cache made for other shards is stale: retrained on the train split, never used. (That
    # training is the one above, whose weights the cache holds: counted here, not run again.)
    trainings = []
    monkeypatch.setattr(classifier, "train_classifier", lambda *args: trainings.append(args) or cached)
    payload = torch.load(cache, weights_only=True)
    payload["key"]["manifest_sha256"] = "0" * 64
    torch.save(payload, cache)
    classifier_judge(shards)
    assert "is stale (other shards or recipe, or unreadable): retraining" in capsys.readouterr().out
    assert torch.load(cache, weights_only=True)["key"]["manifest_sha256"] == shards.digest
    # So is one cut short.
    cache.write_bytes(cache.read_bytes()[:100])
    assert classifier_judge(shards).sha256 == first.sha256
    assert "retraining" in capsys.readouterr().out and len(trainings) == 2
    assert all(torch.equal(x, images) and torch.equal(y, labels) for x, y in trainings)


def test_in_training_fid_on_digits_is_refused_before_ray_starts(digits_shards, tmp_path):
    proc = run_main(
        "jobs/train.py", "--preset", "digits", "--data", digits_shards, "--storage", tmp_path, "--fid-every", 10
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "in-training FID uses Inception, which does not apply to the 8x8 grey digits" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_evaluate_measures_fd_digits_with_the_floor_and_logs_them(digits_shards, tmp_path, ray_address, mlflow_uri):
    digits = digits_shards
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", mlflow_run_id="training-run-9", preset="digits")
    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "RAY_ADDRESS": ray_address}
    args = ["--checkpoint", checkpoint, "--data", digits, "--n", 100, "--steps", 5, "--batch-size", 50]
    proc = run_main("jobs/evaluate.py", *args, ray=True, **env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])
    assert "fid" not in results and results["n"] == 100 and results["reference_n"] == 1437
    # Measured here: floor 7.85 (the 360 test images against the 1,437 train images); an
    # untrained UNet's samples are noise, hundreds above it.
    assert 3 < results["fd_digits_floor"] < 15, results
    assert results["fd_digits"] > 10 * results["fd_digits_floor"], results
    assert 1 <= results["classifier_score_mean"] <= 10 and 0 <= results["confident_share"] <= 1
    assert "FD-digits" in proc.stdout and "(test vs train)" in proc.stdout
    for name in ("fd-digits-stats-train.npz", "fd-digits-stats-test.npz", "classifier.pt"):
        assert Path(digits, name).is_file(), name

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.kind = 'evaluation'")
    assert run.data.metrics["fd_digits"] == pytest.approx(results["fd_digits"])
    assert run.data.metrics["fd_digits_floor"] == pytest.approx(results["fd_digits_floor"])
    assert len(run.data.params["classifier_weights_sha256"]) == 64 and run.info.run_name.startswith("fd_digits-")


@pytest.mark.parametrize("fmt", ["png", "json", "npz"])
def test_serve_answers_and_reads_grey_images(fmt):
    """Serve's encoders and upload decoder for a one-channel model (the digits UNet)."""
    from PIL import Image

    from diffusion.images import to_uint8
    from diffusion.platform.http import decode_png, encode

    images = np.arange(2 * 64, dtype=np.uint8).reshape(2, 8, 8, 1) * 2
    body = encode(images, fmt, {}).body
    if fmt == "json":
        first = base64.b64decode(json.loads(body)["images"][0])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(first))), images[0, :, :, 0])
        x = decode_png(base64.b64encode(first).decode(), (1, 8, 8), "image")
        assert x.shape == (1, 8, 8) and torch.equal(to_uint8(x[None])[0, 0], torch.from_numpy(images[0, :, :, 0]))
    elif fmt == "npz":
        assert np.array_equal(np.load(io.BytesIO(body))["images"], images)
    else:
        assert Image.open(io.BytesIO(body)).size == (22, 12)  # two 8x8 tiles, 2-pixel borders
