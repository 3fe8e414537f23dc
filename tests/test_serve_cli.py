"""jobs/serve.py as a user runs it: serving a registered MLflow model over HTTP until SIGTERM; a
bad checkpoint named before Ray starts; Ctrl-C and SIGTERM while Ray's start-up waits."""

import os
import signal
import time
from unittest.mock import patch

import pytest

from diffusion.platform.net import wait_for_http
from helpers import cli_popen, free_port, npz, post, registered_tiny_model, run_main, tiny_checkpoint

pytestmark = pytest.mark.timeout(600)


@pytest.mark.slow
def test_serve_cli_serves_a_registered_model_and_stops_on_sigterm(tmp_path, new_mlflow_store):
    """Its own words and nothing else: a ready line, a request to try, and a stopped line (and the
    line in place of Ray's own, `logs`); no error line on a normal stop."""
    store, _ = registered_tiny_model(tmp_path, new_mlflow_store(tmp_path))
    port = free_port()
    args = ["--checkpoint", "models:/tiny/1", "--port", port, "--batch-size", 4, "--max-replicas", 2]
    # Its own Ray, started by the command with the MLflow store in its environment (the tests' Ray
    # was started without it, and a replica reads models:/ from its own environment).
    env = {"RAY_ADDRESS": "local", "MLFLOW_TRACKING_URI": store}
    proc = cli_popen("jobs/serve.py", *args, **env)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", 180, proc, any_status=False)  # the app, not just the proxy
        status, _, body = post(f"http://127.0.0.1:{port}/v1/samples", {"n": 2, "seed": 0, "steps": 3, "format": "npz"})
        assert status == 200 and npz(body).shape == (2, 32, 32, 3)
        output = ""
        while "try: " not in output:  # what a user sees once it is up: from here, a stop is a clean shutdown
            line = proc.stdout.readline()
            assert line, output
            output += line
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    output += proc.stdout.read()
    assert code == 0 and "replicas 1..2 autoscaled" in output, output
    request = f"""curl -X POST http://127.0.0.1:{port}/v1/samples -H 'content-type: application/json' -d '{{"n": 16, "seed": 0}}' -o samples.png"""
    notice = "Ray's own log lines are hidden (--verbose shows them; its processes' logs are in "
    lines = [line for line in output.splitlines() if not line.startswith(notice)]
    assert len(lines) == len(output.splitlines()) - 1, output  # the notice, once (printed by Ray's log thread)
    assert lines[0].startswith(f"serving models:/tiny/1 at http://127.0.0.1:{port}, replicas 1..2 autoscaled"), output
    assert lines[1:] == [f"try: {request}", "stopped serving models:/tiny/1"], output


def test_the_serve_cli_names_a_bad_checkpoint_before_starting_ray(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    proc = run_main("jobs/serve.py", "--checkpoint", tmp_path / "checkpoint.pt", "--port", free_port())
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "is empty" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Ray" not in proc.stderr  # one line, no traceback


def test_the_serve_cli_binds_other_addresses_only_with_an_api_key(tmp_path):
    """Off loopback, no key is refused before Ray starts, naming the variable and the way out."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_DIFFUSION_API_KEY"}
    with patch.dict(os.environ, env, clear=True):
        proc = run_main("jobs/serve.py", "--checkpoint", tmp_path / "run", "--host", "0.0.0.0", "--port", free_port())
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "--host 0.0.0.0 serves other machines: set RAY_DIFFUSION_API_KEY" in proc.stderr
    assert "or bind 127.0.0.1" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_serve_cli_stops_while_ray_starts(tmp_path, sig):
    """A Ray address nobody answers at: Ray's start-up waits there for minutes, and Ctrl-C or
    SIGTERM still end the command at once."""
    tiny_checkpoint(tmp_path / "ckpt")
    args = ["--checkpoint", tmp_path / "ckpt", "--verbose"]  # Ray's lines: its own says when it connects
    proc = cli_popen("jobs/serve.py", *args, RAY_ADDRESS=f"127.0.0.1:{free_port()}")
    output = ""
    while "Connecting to existing Ray cluster" not in output:  # the checkpoint is read; Ray is connecting
        line = proc.stdout.readline()
        assert line, output
        output += line
    start = time.time()
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert time.time() - start < 20  # at once: Ray's start-up alone waits minutes
