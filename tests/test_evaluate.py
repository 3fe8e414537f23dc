"""jobs/evaluate.py end to end on a local Ray: shards -> reference statistics (cached beside the
shards) -> samples of a tiny checkpoint -> Inception features -> FID and IS in MLflow. The
Inception is randomly initialised (NOT the real FID weights), so the numbers test the
pipeline, not sample quality."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from helpers import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)


def evaluate_cmd(checkpoint, data, weights, *extra):
    return [
        sys.executable,
        "jobs/evaluate.py",
        "--checkpoint",
        checkpoint,
        "--data",
        data,
        "--splits",
        "test",
        "--n",
        "20",
        "--steps",
        "3",
        "--batch-size",
        "10",
        "--inception-weights",
        str(weights),
        *extra,
    ]


def test_evaluation_pipeline_logs_fid_and_every_setting(cifar_shards, random_inception, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", mlflow_run_id="training-run-7")
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking, RAY_ADDRESS="local", RAY_AUTH_MODE="disabled")
    proc = subprocess.run(
        evaluate_cmd(checkpoint, cifar_shards, random_inception),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])
    assert results["n"] == 20 and results["reference_n"] == 200 and not results["reference_cached"]
    assert results["fid"] > 0 and results["is_mean"] >= 1
    cache = Path(cifar_shards) / "fid-stats-test.npz"
    assert cache.is_file() and not list(Path(cifar_shards).glob("*.partial"))
    with np.load(cache) as stats:
        assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048) and int(stats["n"]) == 200

    client = MlflowClient(tracking)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("ray-diffusion").experiment_id], "tags.kind = 'evaluation'"
    )
    assert run.data.tags["training_run_id"] == "training-run-7"
    assert run.data.metrics["fid"] == pytest.approx(results["fid"])
    params = run.data.params
    assert (params["weights"], params["sampler"], params["steps"], params["eta"], params["spacing"]) == (
        "ema",
        "ddim",
        "3",
        "0.0",
        "quadratic",
    )
    assert (
        params["reference_splits"] == "test" and params["n"] == "20" and len(params["inception_weights_sha256"]) == 64
    )

    # Again with the raw weights: the reference statistics come from the cache, the FID differs.
    proc = subprocess.run(
        evaluate_cmd(checkpoint, cifar_shards, random_inception, "--raw"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])
    assert raw["reference_cached"] and raw["weights"] == "raw" and raw["fid"] != results["fid"]


def test_missing_inception_weights_name_the_file_and_where_to_put_it(tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    proc = subprocess.run(
        evaluate_cmd(str(tmp_path / "ckpt"), str(tmp_path / "data"), tmp_path / "missing.pth"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "missing.pth do not exist" in proc.stderr
    assert "pt_inception-2015-12-05-6726825d.pth" in proc.stderr and "--inception-weights" in proc.stderr


def test_training_logs_fid_every_k_steps_from_all_workers(
    ray_local, cifar_shards, random_inception, tmp_path, monkeypatch
):
    from diffusion.ray_train import RUN_NAME_TAG, fit
    from diffusion.training import PRESETS

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = PRESETS["tiny"].replace(
        data=cifar_shards,
        storage=str(tmp_path / "runs"),
        name="fid",
        num_workers=2,
        max_steps=10,
        log_every=5,
        eval_every=5,
        checkpoint_every=10,
        sample_every=10,
        sample_n=4,
        sample_steps=3,
        heldout_size=16,
        fid_every=5,
        fid_n=6,
        fid_splits="test",
        inception_weights=str(random_inception),
    )
    assert fit(config).error is None
    client = MlflowClient(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("ray-diffusion").experiment_id], f"tags.`{RUN_NAME_TAG}` = 'fid'"
    )
    history = client.get_metric_history(run.info.run_id, "fid")
    assert [m.step for m in history] == [5, 10] and all(m.value > 0 for m in history)
    assert run.data.tags["fid_reference_n"] == "200" and len(run.data.tags["fid_reference_weights_sha256"]) == 64
    assert run.data.params["fid_n"] == "6" and run.data.params["sample_steps"] == "3"
