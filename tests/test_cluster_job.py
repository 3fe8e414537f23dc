"""`ray job submit` of the training job to a real Ray head on 127.0.0.1."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from diffusion.checkpoint import read_checkpoint
from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def ray_head():
    """`ray start --head --block` as a child process (never `ray stop`, which kills every Ray
    process on the machine), on its own ports and temp dir; stopped with SIGTERM."""
    bin_dir = Path(sys.executable).parent
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is the head's
        RAY_AUTH_MODE="disabled",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    cmd = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--temp-dir={temp_dir}",
    ]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            assert head.poll() is None, "ray start --head exited"
            time.sleep(1)
    else:
        pytest.fail("the Ray dashboard did not come up within 120 s")
    yield address, env
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_and_checkpoints(ray_head, cifar_shards, tmp_path):
    address, env = ray_head
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        f"--address={address}",
        f"--working-dir={ROOT}",
        f'--runtime-env-json={{"env_vars": {{"MLFLOW_TRACKING_URI": "{tracking}"}}}}',
        "--",
        "python",
        "jobs/train.py",
        "--preset",
        "tiny",
        "--data",
        cifar_shards,
        "--storage",
        str(tmp_path / "runs"),
        "--name",
        "submitted",
        "--num-workers",
        "1",
        "--max-steps",
        "10",
        "--checkpoint-every",
        "10",
        "--eval-every",
        "10",
        "--sample-every",
        "10",
        "--log-every",
        "5",
        "--heldout-size",
        "32",
        "--sample-n",
        "4",
        "--sample-steps",
        "4",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 10/10" in proc.stdout  # progress reaches the job logs
    assert read_checkpoint(tmp_path / "runs" / "submitted")["step"] == 10
    client = MlflowClient(tracking)
    run = client.search_runs([client.get_experiment_by_name("ray-diffusion").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["ray_job_id"]
