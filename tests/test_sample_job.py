"""jobs/sample.py: N images to an S3 endpoint on 127.0.0.1 through Ray Data, and an MLflow
run with the sample grid and the papers' figures."""

import io
import json
import os
from pathlib import Path

import boto3
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from diffusion.platform.settings import EXPERIMENT
from helpers import cli, run_main, tiny_checkpoint, tiny_diffusers_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_sample_job_writes_images_to_s3_and_figures_to_mlflow(s3, tmp_path, ray_address, mlflow_uri):
    # T = 100 keeps the figures' DDPM chains short; their timesteps follow the model's T.
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", mlflow_run_id="training-run-123", num_timesteps=100)
    args = ["--checkpoint", checkpoint, "--seeds", "100-119", "--steps", 5, "--batch-size", 2]
    args += ["--out", f"s3://{s3}/samples/demo", "--figures", "--figure-seeds", 2]
    proc = cli("jobs/sample.py", *args, MLFLOW_TRACKING_URI=mlflow_uri, RAY_ADDRESS=ray_address)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "20/20" in proc.stderr and "wrote 20 images" in proc.stdout  # the progress bar, in a log

    s3_client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=s3, Prefix="samples/demo/")["Contents"])
    pngs = [k for k in keys if k.endswith(".png") and k.split("/")[-1][0].isdigit()]
    assert pngs == [f"samples/demo/{seed:010d}.png" for seed in range(100, 120)]
    names = ("ddim_consistency", "ddim_interpolation", "ddpm_interpolation", "ddpm_sequence")
    assert {f"samples/demo/figures/{n}.png" for n in names} | {"samples/demo/samples.png"} <= set(keys)
    image = Image.open(io.BytesIO(s3_client.get_object(Bucket=s3, Key=pngs[0])["Body"].read()))
    assert image.size == (32, 32) and np.asarray(image).std() > 1
    summary = json.loads(s3_client.get_object(Bucket=s3, Key="samples/demo/sampling.json")["Body"].read())
    assert summary["n"] == 20 and summary["sampler"] == "ddim" and summary["steps"] == 5

    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["training_run_id"] == "training-run-123"
    assert run.data.metrics["images"] == 20 and run.data.metrics["images_per_s"] > 0
    figures = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {f"{n}.png" for n in names}  # the labelled figures, as jobs/generate.py writes them
    local = Path(client.download_artifacts(run.info.run_id, "figures", str(tmp_path / "figs")))
    tile = 3 * 32  # the 32-pixel images, scaled up for the labels
    with Image.open(local / "ddim_consistency.png") as fig:  # 4 rows (S = 10, 20, 50, 100 <= T) x 2 seeds
        assert 4 * tile < fig.size[1] < 5 * tile and 2 * tile < fig.size[0]
    with Image.open(local / "ddpm_interpolation.png") as fig:  # t = T/10 x (2 samples and 9 lambdas between)
        assert 11 * tile < fig.size[0] < 12 * tile and tile < fig.size[1] < 2 * tile and np.asarray(fig).std() > 1
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(p.startswith("images/samples+step+0+") and p.endswith(".png") for p in images)  # the grid
    grid = s3_client.get_object(Bucket=s3, Key="samples/demo/samples.png")["Body"].read()
    with Image.open(io.BytesIO(grid)) as grid:
        assert grid.size == (5 * 32 + 6 * 2, 4 * 32 + 5 * 2)  # the 20 images, 5 per row
        assert np.array_equal(np.asarray(grid.convert("RGB"))[2:34, 2:34], np.asarray(image))  # seed 100 first


def test_sample_job_npz_shards_locally_from_a_diffusers_folder(tmp_path, ray_address, mlflow_uri):
    checkpoint = tiny_diffusers_folder(tmp_path / "pipeline")  # imported weights
    out = tmp_path / "out"
    args = ["--checkpoint", checkpoint, "--n", 10, "--sampler", "dpmpp_2m", "--steps", 3, "--batch-size", 4]
    args += ["--format", "npz", "--out", out]
    proc = run_main("jobs/sample.py", *args, ray=True, MLFLOW_TRACKING_URI=mlflow_uri, RAY_ADDRESS=ray_address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted(out.glob("shard-*.npz"))
    seeds = np.concatenate([np.load(s)["seeds"] for s in shards])
    assert sorted(seeds.tolist()) == list(range(10))
    assert all(np.load(s)["images"].shape[1:] == (32, 32, 3) for s in shards)
    assert json.loads((out / "sampling.json").read_text())["sampler"] == "dpmpp_2m"


def test_a_missing_checkpoint_is_named_before_ray_starts(tmp_path):
    proc = run_main("jobs/sample.py", "--checkpoint", tmp_path / "nothing", "--out", tmp_path / "out")
    assert proc.returncode == 1 and "no checkpoint at" in proc.stderr
    assert "Ray" not in proc.stderr and not (tmp_path / "out").exists()
