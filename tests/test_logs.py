"""What a job's log shows: its workers' stdout (the project's lines), and Ray's own stderr only
with --verbose, on a real Ray (`diffusion.platform.logs`). The whole default log of a training
run is checked in tests/test_train.py, Serve's in tests/test_serve_cli.py."""

import json
import subprocess
import sys
from pathlib import Path

from diffusion.platform.logs import WithoutPoolAdvice, WorkerOutput
from helpers import ROOT, cli_env

DRIVER = """
import io, json, logging, sys, time
import ray
from diffusion.platform.logs import project_lines_to_stdout
from diffusion.platform.resources import connect

@ray.remote
def speak(tag):
    project_lines_to_stdout().info(f"project line {tag}")
    print(f"printed line {tag}")
    logging.getLogger("ray.data").warning(f"ray's line {tag}")
    return tag

outputs = {}
for tag, verbose in enumerate((False, True)):
    sys.stdout, sys.stderr = out, err = io.StringIO(), io.StringIO()  # where the driver prints its workers' lines
    connect(verbose=verbose)
    ray.get(speak.remote(tag))
    last = f"ray's line {tag}" if verbose else "Ray's own log lines are hidden"
    deadline = time.time() + 60  # the lines come from Ray's log thread, after the task's result
    while time.time() < deadline and not all(s in out.getvalue() + err.getvalue() for s in (f"printed line {tag}", last)):
        time.sleep(0.2)
    ray.shutdown()
    outputs[verbose] = {"out": out.getvalue(), "err": err.getvalue()}
sys.__stdout__.write(json.dumps(outputs))
"""


def test_a_driver_shows_its_workers_stdout_and_ray_s_stderr_with_verbose_only(ray_address):
    """A driver joining the session's Ray: by default its workers' project lines and prints, and
    one line in place of Ray's own (with where its processes' logs are); with verbose, Ray's too."""
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER],
        check=False,
        cwd=ROOT,
        env=cli_env(RAY_ADDRESS=ray_address),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    quiet, verbose = json.loads(proc.stdout).values()
    assert "project line 0\n" in quiet["out"] and "printed line 0\n" in quiet["out"], quiet
    assert "ray's line" not in quiet["out"] + quiet["err"], quiet
    (notice,) = [line for line in quiet["out"].splitlines() if "Ray's own log lines are hidden" in line]
    logs_dir = notice.split("its processes' logs are in ")[1].rstrip(")")
    assert notice.startswith("Ray's own log lines are hidden (--verbose shows them;") and Path(logs_dir).is_dir()
    assert "ray's line 1" in verbose["err"] and "printed line 1\n" in verbose["out"], verbose
    assert "project line 1\n" in verbose["out"] and "hidden" not in verbose["out"], verbose


def test_worker_output_passes_stdout_and_says_once_that_stderr_is_hidden(capsys):
    shown = []
    output = WorkerOutput(shown.append, "/tmp/ray/session_x/logs")
    batches = [
        {"lines": ["a"], "is_err": False},
        {"lines": [], "is_err": True},
        {"lines": ["b", "c"], "is_err": True},
        {"lines": ["d"], "is_err": True},
    ]
    for data in batches:
        output(data)
    assert shown == batches[:1] and output.hidden == 3
    assert capsys.readouterr().out == (
        "Ray's own log lines are hidden (--verbose shows them; its processes' logs are in /tmp/ray/session_x/logs)\n"
    )


def test_the_raylets_worker_pool_advice_is_hidden_and_its_other_messages_shown():
    shown = []
    printer = WithoutPoolAdvice(lambda data, ignore_prefix: shown.append(data))
    advice = "WARNING: 12 PYTHON worker processes have been started on node: 0f3 with address: 10.0.0.5, which is 6x"
    messages = [
        {"lines": [advice], "pid": "raylet", "is_err": False},  # Ray's advice when a busy machine starts workers slowly
        {"lines": ["A worker died or was killed while executing a task"], "pid": "raylet", "is_err": False},
        {"lines": [advice], "pid": 123, "is_err": False},  # a worker that prints those words is shown
    ]
    for data in messages:
        printer(data, False)
    assert shown == messages[1:]
    from ray._private import worker as ray_worker

    from diffusion.platform.logs import hide_worker_pool_advice

    # The raylet's messages reach the driver through Ray's error listener, which calls this global.
    assert "print_to_stdstream" in ray_worker.listen_error_messages.__code__.co_names
    original = ray_worker.print_to_stdstream
    try:
        hide_worker_pool_advice(True)
        assert isinstance(ray_worker.print_to_stdstream, WithoutPoolAdvice)
        assert ray_worker.print_to_stdstream.show is original
        hide_worker_pool_advice(True)  # once only
        assert ray_worker.print_to_stdstream.show is original
    finally:
        hide_worker_pool_advice(False)
    assert ray_worker.print_to_stdstream is original
