"""jobs/evaluate.py end to end on a local Ray: shards -> reference statistics (cached beside the
shards) -> samples of a tiny checkpoint -> Inception features -> FID and IS in MLflow. The
Inception is randomly initialised (NOT the real FID weights), so the numbers test the
pipeline, not sample quality. The two commands of docs/evaluation.md, at smoke size (their flags,
with other values), are this pipeline's two runs (tests/test_documented_commands.py: PARSED)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from diffusion.platform.settings import EXPERIMENT
from helpers import cli, run_main, tiny_checkpoint

pytestmark = pytest.mark.timeout(900)


def evaluate_args(checkpoint, data, weights, *extra):
    args = ["--checkpoint", checkpoint, "--data", data, "--splits", "test", "--n", 20, "--steps", 3]
    return [*args, "--batch-size", 10, "--inception-weights", weights, *extra]


@pytest.mark.slow
def test_evaluation_pipeline_logs_fid_and_every_setting(
    cifar_shards, random_inception, tmp_path, ray_address, mlflow_uri
):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", mlflow_run_id="training-run-7")
    cache = Path(cifar_shards) / "fid-stats-test.npz"
    made_before = cache.exists()  # by another test of this session: then this run must use it
    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "RAY_ADDRESS": ray_address}
    documented = ("--sampler", "ddim", "--spacing", "quadratic")  # the defaults, as docs/evaluation.md writes them
    proc = cli("jobs/evaluate.py", *evaluate_args(checkpoint, cifar_shards, random_inception, *documented), **env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])
    assert results["n"] == 20 and results["reference_n"] == 100 and results["reference_cached"] == made_before
    assert results["fid"] > 0 and results["is_mean"] >= 1
    assert re.search(r"^FID [\d.]+, IS [\d.]+ \+- [\d.]+ \(20 samples vs 100 test images\)$", proc.stdout, re.M)
    assert cache.is_file() and not list(Path(cifar_shards).glob("*.partial"))
    with np.load(cache) as stats:
        assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048) and int(stats["n"]) == 100

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.kind = 'evaluation'")
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

    # Again with the raw weights and DPM-Solver++: the reference statistics come from the cache, the FID differs.
    proc = run_main(
        "jobs/evaluate.py",
        *evaluate_args(checkpoint, cifar_shards, random_inception, "--weights", "raw", "--sampler", "dpmpp_2m"),
        ray=True,
        **env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])
    assert raw["reference_cached"] and raw["weights"] == "raw" and raw["fid"] != results["fid"]
    assert raw["sampler"] == "dpmpp_2m" and raw["steps"] == 3


def test_missing_inception_weights_name_the_file_and_where_to_put_it(cifar_shards, tmp_path):
    args = evaluate_args(tiny_checkpoint(tmp_path / "ckpt"), cifar_shards, tmp_path / "missing.pth")
    proc = run_main("jobs/evaluate.py", *args, TORCH_HOME=tmp_path / "torch")
    assert proc.returncode == 1 and "missing.pth do not exist" in proc.stderr
    assert "pt_inception-2015-12-05-6726825d.pth" in proc.stderr and "--inception-weights" in proc.stderr
