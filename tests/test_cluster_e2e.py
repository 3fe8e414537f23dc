"""The whole design card on one machine, through the commands a user runs: cluster/stack.py up
(a Ray head, an S3 endpoint and an MLflow server on 127.0.0.1), a CIFAR-10 subset into S3,
`ray job submit` of a training run that checkpoints to S3 and logs to the MLflow server, of
the batch sampling job, and of the Serve app deployed from the checkpoint, a PNG over HTTP,
the runs and their images in MLflow (artifacts in S3), and `down` leaving nothing behind."""

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import psutil
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers import SHARED_CIFAR, cifar_subset_folder, free_port, mlflow_images

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "ray-diffusion"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def sh(cmd: list, env: dict, timeout: float = 600) -> str:
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:4]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def stack_env(state_dir: Path) -> dict:
    """The user's shell after `source <state>/env`."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    for line in (state_dir / "env").read_text().splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value
    return env


def stack_processes(state_dir: Path) -> list[psutil.Process]:
    """Every process the stack started, with their descendants and every Ray process of its temp dir."""
    state = json.loads((state_dir / "stack.json").read_text())
    procs = []
    for svc in state["services"].values():
        leader = psutil.Process(svc["pid"])
        procs += [leader, *leader.children(recursive=True)]
    temp_dir = state["services"]["ray"]["temp_dir"]
    procs += [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in a for a in p.info["cmdline"] or [])]
    return procs


def test_up_refuses_a_busy_port_and_starts_nothing(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [sys.executable, "cluster/stack.py", "--state-dir", str(tmp_path), "up", "--dashboard-port", str(port)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"port {port} (--dashboard-port) is in use" in proc.stderr and "pass another --dashboard-port" in proc.stderr
    assert not (tmp_path / "stack.json").exists() and not (tmp_path / "env").exists()


def test_up_refuses_while_a_recorded_stack_runs(tmp_path):
    """A second `up` on a running stack's state would orphan it: refused, and the record kept."""
    me = psutil.Process()
    record = {"services": {"s3": {"pid": me.pid, "started": me.create_time(), "port": free_port(), "log": ""}}}
    (tmp_path / "stack.json").write_text(json.dumps(record))
    stack = [sys.executable, "cluster/stack.py", "--state-dir", str(tmp_path)]
    proc = subprocess.run(stack + ["up"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "is already running" in proc.stderr and "down` first" in proc.stderr
    assert json.loads((tmp_path / "stack.json").read_text()) == record
    nothing = [sys.executable, "cluster/stack.py", "--state-dir", str(tmp_path / "none"), "status"]
    status = subprocess.run(nothing, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert status.returncode == 3 and "no stack recorded" in status.stdout


def running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_cluster_end_to_end(tmp_path):
    if not SHARED_CIFAR.exists():
        pytest.skip(f"end-to-end check skipped: {SHARED_CIFAR} is absent (it exists on developer machines and CI)")
    state_dir = tmp_path / "stack"
    ports = {flag: free_port() for flag in ("--ray-port", "--dashboard-port", "--s3-port", "--mlflow-port")}
    stack = [sys.executable, "cluster/stack.py", "--state-dir", state_dir]
    up_args = [a for flag, port in ports.items() for a in (flag, port)] + ["--num-cpus", "2"]
    out = sh(stack + ["up", *up_args], dict(os.environ), timeout=300)
    assert f"http://127.0.0.1:{ports['--mlflow-port']}" in out and "source" in out
    secret = (state_dir / "env").read_text().split("AWS_SECRET_ACCESS_KEY=")[1].split()[0]
    assert secret not in out and (state_dir / "env").stat().st_mode & 0o077 == 0  # credentials: the 0600 file only
    try:
        env = stack_env(state_dir)
        assert sh(stack + ["status"], env).count("running") == 3
        serve_port = free_port()
        run_end_to_end(tmp_path, env, serve_port)
        started = stack_processes(state_dir)
        assert len(started) > 5  # moto, mlflow, and Ray's head daemons and workers
        temp_dir = json.loads((state_dir / "stack.json").read_text())["services"]["ray"]["temp_dir"]
    finally:
        down = subprocess.run([str(c) for c in stack + ["down"]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    started += [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in a for a in p.info["cmdline"] or [])]
    alive = [p for p in started if running(p)]
    assert not alive, f"left running after down: {[(p.pid, p.name()) for p in alive]}"
    for port in [*ports.values(), serve_port]:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open after down"
    assert not (state_dir / "stack.json").exists() and not (state_dir / "env").exists()


def run_end_to_end(tmp_path: Path, env: dict, serve_port: int) -> None:
    data, runs, samples = f"s3://{BUCKET}/data/cifar10", f"s3://{BUCKET}/runs", f"s3://{BUCKET}/samples/e2e"
    folder = cifar_subset_folder(tmp_path / "images", {"train": 20, "test": 5})
    sh([sys.executable, "jobs/prepare_data.py", "--dataset", "imagefolder", "--source", folder, "--out", data], env)

    submit = ["ray", "job", "submit", "--working-dir", ROOT, "--", "python"]
    train = ["jobs/train.py", "--preset", "tiny", "--data", data, "--storage", runs, "--name", "e2e"]
    train += ["--num-workers", "1", "--max-steps", "8", "--checkpoint-every", "8", "--eval-every", "8"]
    train += [
        "--sample-every",
        "8",
        "--log-every",
        "4",
        "--heldout-size",
        "16",
        "--sample-n",
        "4",
        "--sample-steps",
        "4",
    ]
    out = sh(submit + train, env)
    assert "succeeded" in out and "step 8/8" in out
    assert f"latest checkpoint: {runs}/e2e/checkpoint-000000008" in out  # a URI the next jobs take

    s3 = boto3.Session(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    s3 = s3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(k.startswith("runs/e2e/checkpoint-") and k.endswith("checkpoint.pt") for k in keys), keys

    sample = ["jobs/sample.py", "--checkpoint", f"{runs}/e2e", "--n", "6", "--steps", "4", "--batch-size", "3"]
    assert "succeeded" in sh(submit + sample + ["--out", samples], env)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="samples/e2e/")["Contents"]]
    assert sorted(k for k in keys if k.endswith(".png")) == [
        *(f"samples/e2e/{seed:010d}.png" for seed in range(6)),
        "samples/e2e/samples.png",  # the grid of the first images
    ]
    assert "samples/e2e/sampling.json" in keys

    serve = ["jobs/serve.py", "--checkpoint", f"{runs}/e2e", "--port", serve_port, "--batch-size", "2", "--detach"]
    assert "succeeded" in sh(submit + serve, env)
    png = post_until_served(f"http://127.0.0.1:{serve_port}/v1/samples", {"n": 2, "seed": 0, "steps": 4})
    assert Image.open(io.BytesIO(png)).size == (70, 36)  # two 32x32 images in a row, 2-px padding
    sh(["serve", "shutdown", "--yes"], env)

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs_found = client.search_runs([client.get_experiment_by_name("ray-diffusion").experiment_id])
    by_kind = {r.data.tags["kind"]: r for r in runs_found}
    assert by_kind.keys() >= {"training", "sampling"}, [r.data.tags for r in runs_found]
    training, sampling = by_kind["training"], by_kind["sampling"]
    assert training.info.status == "FINISHED" and training.data.tags["checkpoint_uri"].startswith(f"{runs}/e2e")
    assert training.data.tags["ray_job_id"] and training.data.metrics["replicas_identical"] == 1.0
    assert sampling.data.tags["training_run_id"] == training.info.run_id
    grids = mlflow_images(client, training.info.run_id, "samples")
    assert list(grids) == [8], grids  # the EMA grid at its step, as an MLflow image
    Image.open(grids[8]).verify()  # a real PNG, served back by the tracking server
    assert list(mlflow_images(client, sampling.info.run_id, "samples")) == [0]
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="mlflow/")["Contents"]]
    assert sum(k.endswith(".png") for k in stored) >= 2  # the artifacts live in the S3 bucket


def post_until_served(url: str, body: dict, timeout: float = 180) -> bytes:
    deadline = time.time() + timeout
    while True:
        request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                assert response.headers["content-type"] == "image/png"
                return response.read()
        except (urllib.error.URLError, ConnectionError) as e:
            if time.time() > deadline:
                raise AssertionError(f"{url} did not answer within {timeout} s: {e}") from e
            time.sleep(1)
