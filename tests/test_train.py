"""Ray Train on a local Ray (2 CPU workers, tiny UNet, real CIFAR-10 images): the command line's
log, checkpoints, MLflow, resume, failure recovery, identical replicas."""

import itertools
import json
import math
import re
import threading
import time

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from diffusion import load_checkpoint
from diffusion.checkpoint import checkpoint_dir_name, recipe_of
from diffusion.platform.checkpoint_uris import read_checkpoint
from diffusion.platform.ray_train import train_on_ray
from diffusion.platform.settings import EXPERIMENT, PRESETS
from diffusion.platform.tracking import EXPERIMENT_KIND_TAG, RUN_NAME_TAG
from diffusion.speed import cpu_has_native_bf16
from diffusion.training import shaped_to_data
from helpers import cli, mlflow_images, own_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


TINY = {
    "num_workers": 2,
    "log_every": 5,
    "eval_every": 10,
    "checkpoint_every": 10,
    "sample_every": 20,
    "sample_n": 4,
    "sample_steps": 4,
    "heldout_size": 32,
}


def tiny(data, storage, name, **overrides):
    return PRESETS["tiny"].replace(**{"data": data, "storage": str(storage), "name": name, **TINY, **overrides})


def the_run(uri, name):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{name}'")
    assert len(runs) == 1
    return client, runs[0]


def steps_of(client, run_id, metric):
    return [m.step for m in client.get_metric_history(run_id, metric)]


# The lines of a default training log: the run, where its workers run, progress, its end, where
# to look; and the one line in place of Ray's own.
WORKER = r"\(RayTrainWorker pid=\d+(, ip=[\d.]+)?\) "
PROJECT_LINE = re.compile(
    r"run \S+: \d+ training images \(\w+\) from .*"
    r"|Ray's own log lines are hidden \(--verbose shows them; its processes' logs are in \S+\)"
    rf"|{WORKER}(\d+ worker\(s\) on .*|step \d+/\d+ \| loss .*|done at step \d+: .*)"
    r"|MLflow run \w+: mlflow ui .*|latest checkpoint: \S+"
)


def train_on_the_command_line(data, storage, name: str, max_steps: int, mlflow_uri: str, ray_address: str) -> None:
    """jobs/train.py as a user runs it, on the session's Ray, its output to pipes (as to a log file
    or a job's log): the project's lines only, without colour codes (Ray's with --verbose), the
    workers' ending with where the MLflow UI shows the run and the latest checkpoint."""
    import ray

    options = [f"--{key.replace('_', '-')}={value}" for key, value in TINY.items()]
    args = ["--preset", "tiny", "--data", data, "--storage", storage, "--name", name, "--max-steps", max_steps]
    proc = cli("jobs/train.py", *args, *options, MLFLOW_TRACKING_URI=mlflow_uri, RAY_ADDRESS=ray_address)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "(RayTrainWorker pid=" in log and f"step {max_steps}/{max_steps} | loss" in log  # workers' lines
    assert "\x1b[" not in log
    assert not [line for line in log.splitlines() if not PROJECT_LINE.fullmatch(line)], log  # nothing of Ray's
    # Two CPU workers on the session's 2 CPUs train on one thread each (half a CPU and their part
    # of the one kept for Ray Data); bf16 where the CPU has native bf16 (auto). Both on this node.
    precision = "bf16" if cpu_has_native_bf16() else "fp32"
    node = ray.util.get_node_ip_address()
    assert f"2 worker(s) on cpu, 1 torch thread(s) each, {precision}, on {node} (ranks 0, 1)" in log
    _, run = the_run(mlflow_uri, name)
    page = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    lines = proc.stdout.splitlines()  # Ray may print a worker's last lines after them
    assert (
        f"MLflow run {run.info.run_id}: mlflow ui --backend-store-uri {mlflow_uri}, "
        f"then open {page}?workflowType=machine_learning"
    ) in lines
    assert f"latest checkpoint: {storage}/{name}/{checkpoint_dir_name(max_steps)}" in lines


def test_training_checkpoints_tracks_and_resumes_at_the_saved_step(
    ray_address, cifar_shards, random_inception, tmp_path, mlflow_uri
):
    """A run of the command line (its log: `train_on_the_command_line`), resumed in this process:
    its checkpoints, MLflow run and logged models."""
    config = tiny(cifar_shards, tmp_path / "runs", "resume", max_steps=20)
    train_on_the_command_line(cifar_shards, tmp_path / "runs", "resume", 20, mlflow_uri, ray_address)
    run_dir = tmp_path / "runs" / "resume"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-000000010", "checkpoint-000000020"]
    payload = torch.load(run_dir / "checkpoint-000000020" / "checkpoint.pt", weights_only=True)
    assert payload["step"] == 20 and {"model", "ema", "optimizer", "betas", "recipe", "run", "unet"} <= set(payload)
    assert payload["recipe"] == shaped_to_data(config.recipe, 32, 32, 3).to_dict()  # its shape written out
    assert payload["run"]["storage"] == str(tmp_path / "runs")

    client, run = the_run(mlflow_uri, "resume")
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.001" and run.data.params["schedule"] == "linear"
    assert set(config.to_dict()) <= set(run.data.params)
    assert {"loss", "lr", "grad_norm", "images_per_s", "heldout_loss", "heldout_loss_ema"} <= set(run.data.metrics)
    assert run.data.metrics["replicas_identical"] == 1.0  # the DDP replicas end with identical weights and EMA
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] and tags["mlflow.source.type"] == "JOB" and tags["ray_job_id"]
    # The split trained on: the data set's URI and manifest checksum, and the count of the train
    # split's 1,000 images (100 a class), not of the 1,100 the data set holds with its test split.
    (data,) = run.inputs.dataset_inputs
    assert data.dataset.name == "imagefolder:shards/train" and json.loads(data.dataset.source)["uri"] == cifar_shards
    assert json.loads(data.dataset.profile)["num_rows"] == 1000
    experiment = client.get_experiment(run.info.experiment_id)  # for MLflow's training view
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    grids = mlflow_images(client, run.info.run_id, "samples")  # EMA sample grids, one an image step,
    assert sorted(grids) == [0, 20] and Image.open(grids[20]).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # from 0

    # The same name again, with more steps: it continues from step 20, not from 0; now with the
    # training images held in the workers' device memory instead of streamed by Ray Data, an FID
    # every 5 steps from both workers' samples (a randomly initialised Inception: plumbing), and a
    # learning rate that wrecks the model, so that the best checkpoint is no longer the latest:
    # with --keep-checkpoints 1 it stays, as does the latest.
    wrecked = {"lr": 0.5, "grad_clip": 0.0, "keep_checkpoints": 1, "data_on_device": "on"}
    fid = {"fid_every": 5, "fid_n": 6, "fid_splits": "test", "inception_weights": str(random_inception)}
    assert train_on_ray(config.replace(max_steps=30, **wrecked, **fid)).error is None
    client, run = the_run(mlflow_uri, "resume")  # the same MLflow run
    assert steps_of(client, run.info.run_id, "loss") == [5, 10, 15, 20, 25, 30]
    assert steps_of(client, run.info.run_id, "resumed_from_step") == [20]
    # The learning rate where it changed: through the 10 warm-up steps, not again once constant
    # (at 20), and once more at the resume's new value (at 25, not 30).
    lrs = client.get_metric_history(run.info.run_id, "lr")
    assert all(a.value != b.value for a, b in itertools.pairwise(lrs)) and {20, 25, 30} & {m.step for m in lrs} == {25}
    assert 400 <= run.data.metrics["images_on_device"] <= 600  # rank 0's half of the 1,000 training images
    assert "max_steps" in run.data.tags["resumed_with_changes"]
    fids = client.get_metric_history(run.info.run_id, "fid")
    assert [m.step for m in fids] == [25, 30] and all(m.value > 0 for m in fids)
    assert run.data.tags["fid_reference_n"] == "100" and len(run.data.tags["fid_reference_weights_sha256"]) == 64
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-000000020", "checkpoint-000000030"]
    assert read_checkpoint(run_dir)["step"] == 30 and read_checkpoint(run_dir, which="best")["step"] == 20
    assert run.data.tags["checkpoint_uri"].endswith("resume/checkpoint-000000030")
    assert read_checkpoint(f"runs:/{run.info.run_id}")["step"] == 30  # an MLflow run stands for its checkpoint

    # Real CIFAR-10 images: the held-out L_simple falls from its initial value of 1, then the wreck
    # (a larger loss, or NaN when it diverged).
    heldout = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "heldout_loss")}
    assert heldout[0] == pytest.approx(1.0, abs=0.05) and heldout[20] < 0.8 * heldout[0]
    assert not heldout[30] <= 0.8 * heldout[0], heldout

    # The final and the best weights as MLflow Models: loaded by MLflow alone, and as checkpoints.
    assert (run.data.tags["model_step_model"], run.data.tags["model_step_best"]) == ("30", "20")
    # Each logged model (both fits logged a final and a best) is linked to the run at its
    # checkpoint's step and carries the run's metrics of that step, its held-out losses among them
    # (those logged when it was: the resume logged resumed_from_step at step 20 later).
    logged = []
    for output in run.outputs.model_outputs:
        model = client.get_logged_model(output.model_id)
        step = read_checkpoint(f"models:/{output.model_id}")["step"]
        at_step = {
            key: m.value
            for key in run.data.metrics
            for m in client.get_metric_history(run.info.run_id, key)
            if m.step == step
        }
        carried = {m.key: m.value for m in model.metrics}
        assert output.step == step and {m.step for m in model.metrics} == {step}
        assert {"loss", "heldout_loss", "heldout_loss_ema"} <= carried.keys() <= at_step.keys()
        # Equal, but where the wreck diverged: MLflow carries a NaN metric into a logged model as 0.0.
        assert all(v == at_step[k] or (math.isnan(at_step[k]) and v == 0) for k, v in carried.items()), carried
        logged.append((model.name, step))
    assert sorted(logged) == [("best", 20), ("best", 20), ("model", 20), ("model", 30)]
    images = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/best").predict(
        pd.DataFrame({"seed": [3, 4]}), params={"steps": 4}
    )
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert read_checkpoint(f"runs:/{run.info.run_id}/best")["step"] == 20

    model, ema_model, loaded = load_checkpoint(str(run_dir))
    assert loaded.max_steps == 30 and loaded.model == "tiny"
    assert not any(torch.equal(a, b) for a, b in zip(model.parameters(), ema_model.parameters()) if a.abs().sum() > 0)


def test_a_killed_worker_is_replaced_and_training_resumes_on_s3(
    ray_local, cifar_shards, s3, tmp_path, mlflow_uri, monkeypatch
):
    """Data and checkpoints in S3 (the endpoint on 127.0.0.1), a worker killed after the first
    checkpoint, and credentials that reach neither MLflow's params nor its tags. The model is
    class-conditional on CIFAR-10's classes: the labels reach both workers through Ray Data (a
    batch without them stops a conditional step), the checkpoint keeps the class names, and the
    MLflow grid has a row per class."""
    from diffusion.platform.shards import ShardSet, write_shards
    from diffusion.platform.sources import Source
    from diffusion.platform.storage import open_location

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-log-this-secret")
    local = ShardSet.open(cifar_shards)  # copy the real subset's training split into the bucket
    chunks = (("train", b["image"], b["label"]) for b in local.iter_batches(256, splits=["train"]))
    data_uri = f"s3://{s3}/data/cifar-subset"
    write_shards(
        Source("imagefolder", ["train"], local.manifest["classes"], chunks), open_location(data_uri), quiet=True
    )

    config = tiny(data_uri, f"s3://{s3}/runs", "failure", max_steps=20, num_classes=10, sample_n=20)
    snapshot = f"{s3}/runs/failure/checkpoint_manager_snapshot.json"
    fs = open_location(f"s3://{s3}").fs
    killed = []

    def registered(name):
        # Ray Train's controller registers a reported checkpoint when it next polls the
        # workers (every 2 s) and records it in this snapshot; a crash before that loses it.
        try:
            with fs.open_input_stream(snapshot) as f:
                return f'"checkpoint_dir_name":"{name}"' in f.read().decode().replace(" ", "")
        except OSError:
            return False

    def kill_a_worker_after_the_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline and not registered("checkpoint-000000010"):
            time.sleep(0.2)
        for proc in own_processes("RayTrainWorker")[:1]:
            proc.kill()
            killed.append(proc.pid)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    result = train_on_ray(config)
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert result.error is None
    assert read_checkpoint(f"s3://{s3}/runs/failure")["step"] == 20
    client, run = the_run(mlflow_uri, "failure")
    resumed = steps_of(client, run.info.run_id, "resumed_from_step")
    assert len(resumed) == 1 and resumed[0] >= 10  # restarted from a checkpoint, not from step 0
    assert run.data.metrics["replicas_identical"] == 1.0 and run.info.status == "FINISHED"
    payload = read_checkpoint(f"s3://{s3}/runs/failure")
    assert recipe_of(payload).max_steps == 20 and payload["run"]["storage"] == f"s3://{s3}/runs"  # information
    assert payload["classes"] == local.manifest["classes"] and payload["unet"]["num_classes"] == 10
    grids = mlflow_images(client, run.info.run_id, "samples")  # a row per class, of 20 // 10 seeds
    assert Image.open(grids[20]).size == (2 * 32 + 3 * 2, 10 * 32 + 11 * 2)
    # Its logged model, loaded by MLflow alone, draws each row's class (by name or index), guided.
    rows = pd.DataFrame({"seed": [3, 3, 3], "class": ["dog", "5", None]})  # None: class seed mod 10, cat
    images = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(
        rows, params={"steps": 4, "guidance_scale": 2.0}
    )
    assert images.shape == (3, 32, 32, 3) and np.array_equal(images[0], images[1])  # dog is CIFAR-10's class 5
    assert not np.array_equal(images[0], images[2])
    logged = str(run.data.params) + str(run.data.tags)
    assert "do-not-log-this-secret" not in logged and "test-key" not in logged
    assert "first 32 training images" in run.data.tags["heldout_source"]  # one split: said so
