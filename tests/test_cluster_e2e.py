"""The whole design card on one machine, through the commands a user runs: cluster/stack.py up
(Ray, an S3 endpoint and an MLflow server), a CIFAR-10 subset into S3, `ray job submit` of a
training run that checkpoints to S3 and logs to the MLflow server, of the batch sampling job and
of the Serve app deployed from its checkpoint, PNGs over HTTP, the runs and their images in MLflow
(artifacts in S3), and `down` leaving nothing behind. The pipeline runs once, on one stack and one
training run (these are the suite's slowest tests): on two hosts where network namespaces can be
made, the training and Serve each losing a host and getting it back; elsewhere on one host
(127.0.0.1), whose stack is checked from `up` to `down` either way."""

import importlib
import io
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import boto3
import psutil
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from diffusion.platform.settings import EXPERIMENT
from helpers import SHARED_CIFAR, cifar_subset_folder, free_port, mlflow_images

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "ray-diffusion"
DATA, RUNS, SAMPLES = f"s3://{BUCKET}/data/cifar10", f"s3://{BUCKET}/runs", f"s3://{BUCKET}/samples/e2e"
SUBMIT = ["ray", "job", "submit", "--working-dir", ROOT]
# Ray's GCS checks every node's health every 3 s and marks it DEAD after 5 failed checks; checked
# every 0.5 s, a lost host is marked DEAD after about 3 s instead of 15 (the same detection, sooner).
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500"}
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def cluster_module(name: str):
    """A module of cluster/ (stack, hosts), imported as `python cluster/stack.py` finds it."""
    if str(ROOT / "cluster") not in sys.path:
        sys.path.insert(0, str(ROOT / "cluster"))
    return importlib.import_module(name)


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


def stack_secrets(state_dir: Path) -> list[str]:
    """The stack's credentials: in its 0600 files only."""
    return secrets_of(stack_env(state_dir))


def secrets_of(env: dict) -> list[str]:
    names = ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "RAY_DIFFUSION_API_KEY")
    return [env[name] for name in names] + [Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()]


def secret_in(path: Path, secrets: list[str]) -> bool:
    data = path.read_bytes()
    return any(secret.encode() in data for secret in secrets)


def stack_processes(state_dir: Path) -> list[psutil.Process]:
    """Every process the stack started, with their descendants and every Ray process of its temp dirs."""
    services = json.loads((state_dir / "stack.json").read_text())["services"].values()
    procs = []
    for svc in services:
        leader = psutil.Process(svc["pid"])
        procs += [leader, *leader.children(recursive=True)]
    return procs + marked_processes([svc["temp_dir"] for svc in services if "temp_dir" in svc])


def marked_processes(temp_dirs: list[str]) -> list[psutil.Process]:
    """The processes whose command line names one of `temp_dirs` (every Ray process of those nodes)."""
    return [
        p for p in psutil.process_iter(["cmdline"]) if any(d in a for d in temp_dirs for a in p.info["cmdline"] or [])
    ]


def running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def concurrently(*calls):
    """The calls' results, run at once in threads: commands and HTTP polls, whose work is in other processes."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


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


def test_up_with_hosts_where_namespaces_cannot_be_made_says_why(tmp_path, monkeypatch, capsys):
    """Without root: one line naming why, and that --hosts 1 works; nothing started or recorded."""
    stack = cluster_module("stack")

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert stack.main(["--state-dir", str(tmp_path), "up", "--hosts", "2"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "--hosts 2 cannot run here: network namespaces need root (this process runs as uid 1000); "
        "--hosts 1 runs the stack on 127.0.0.1\n"
    )
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        stack.main(["--state-dir", str(tmp_path), "up", "--hosts", "0"])
    assert "--hosts must be at least 1, got 0" in capsys.readouterr().err


def namespaces_unavailable() -> str:
    """Why network namespaces cannot be made here ('' when they can)."""
    hosts = cluster_module("hosts")

    try:
        hosts.check_possible()
    except hosts.NamespaceError as e:
        return str(e)
    return ""


# ------------------------------------------------------------------ one host


def test_one_host_stack(tmp_path, monkeypatch):
    """up on 127.0.0.1 at the ports given: the MLflow URL printed and no secret, every file holding
    one 0600, three services running; `down` leaves no process, open port or state, and removes
    MLflow's store with the S3 objects its runs point at, saying so. Where network namespaces
    cannot be made, the end-to-end pipeline runs on it in between (one_host_end_to_end); where they
    can, it runs on two hosts (test_two_hosts_end_to_end_with_one_lost_and_back)."""
    pipeline = bool(namespaces_unavailable())
    if pipeline and not SHARED_CIFAR.exists():
        pytest.skip(f"end-to-end check skipped: {SHARED_CIFAR} is absent (it exists on developer machines and CI)")
    state_dir = tmp_path / "stack"
    ports = {flag: free_port() for flag in ("--ray-port", "--dashboard-port", "--s3-port", "--mlflow-port")}
    stack = [sys.executable, "cluster/stack.py", "--state-dir", state_dir]
    up_args = [a for flag, port in ports.items() for a in (flag, port)] + ["--num-cpus", "2"]
    out = sh(stack + ["up", *up_args], dict(os.environ), timeout=300)
    assert f"http://127.0.0.1:{ports['--mlflow-port']}" in out and "source" in out
    secrets = stack_secrets(state_dir)
    assert not any(s in out for s in secrets)
    files = [f for f in state_dir.rglob("*") if f.is_file() and not f.is_socket()]
    holding = {str(f.relative_to(state_dir)): f.stat().st_mode & 0o777 for f in files if secret_in(f, secrets)}
    assert holding == dict.fromkeys(["env", "mlflow-auth.ini", "ray-token", "stack.json"], 0o600), holding
    serve_port = free_port()
    try:
        env = stack_env(state_dir)
        assert sh(stack + ["status"], env).count("running") == 3
        if pipeline:
            one_host_end_to_end(tmp_path, env, serve_port, monkeypatch)
        started = stack_processes(state_dir)
        assert len(started) > 5  # moto, mlflow, and Ray's head daemons and workers
        temp_dir = json.loads((state_dir / "stack.json").read_text())["services"]["ray"]["temp_dir"]
    finally:
        down = subprocess.run([str(c) for c in stack + ["down"]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"removed {state_dir.resolve() / 'mlflow.db'}: the S3 endpoint's objects" in down.stdout
    assert not (state_dir / "mlflow.db").exists()  # the next `up` shows no runs whose artifacts are gone
    alive = [p for p in started + marked_processes([temp_dir]) if running(p)]
    assert not alive, f"left running after down: {[(p.pid, p.name()) for p in alive]}"
    for port in [*ports.values(), serve_port]:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open after down"
    assert not (state_dir / "stack.json").exists() and not (state_dir / "env").exists()


def one_host_end_to_end(tmp_path: Path, env: dict, serve_port: int, monkeypatch) -> None:
    """Data into S3; a 1-worker training run; from its checkpoint the batch sampling job and the
    Serve app on 127.0.0.1 (deployed at once); the runs in MLflow."""
    prepare_data(cifar_subset_folder(tmp_path / "images", {"train": 20, "test": 5}), env)
    out = sh(SUBMIT + ["--", "python", *train_args("e2e", steps=8, checkpoint_every=8, workers=1)], env)
    assert "succeeded" in out
    assert_trained(out, "e2e", 8)
    s3 = s3_client(env)
    assert checkpoints(s3, "runs/e2e/") == [8]

    serve = ["jobs/serve.py", "--checkpoint", f"{RUNS}/e2e", "--port", serve_port, "--batch-size", "2", "--detach"]
    sampled, served = concurrently(lambda: sample_job(env, "e2e"), lambda: sh(SUBMIT + ["--", "python", *serve], env))
    assert "succeeded" in sampled and "succeeded" in served
    png = post_until_served(f"http://127.0.0.1:{serve_port}/v1/samples", SERVE_BODY, env["RAY_DIFFUSION_API_KEY"])
    assert_two_images(png)
    assert_samples_written(s3)
    concurrently(
        lambda: sh(["serve", "shutdown", "--yes"], env), lambda: assert_tracked(env, monkeypatch, s3, "e2e", 8)
    )


# ------------------------------------------------------------------ the pipeline's parts


def prepare_data(folder: Path, env: dict) -> None:
    sh([sys.executable, "jobs/prepare_data.py", "--dataset", "imagefolder", "--source", folder, "--out", DATA], env)


def train_args(name: str, steps: int, checkpoint_every: int, workers: int) -> list:
    """jobs/train.py on the tiny preset: a held-out evaluation at every checkpoint, a sample grid at the end."""
    cmd = ["jobs/train.py", "--preset", "tiny", "--data", DATA, "--storage", RUNS, "--name", name]
    cmd += ["--num-workers", workers, "--max-steps", steps, "--checkpoint-every", checkpoint_every]
    cmd += ["--eval-every", checkpoint_every, "--log-every", "4", "--heldout-size", "16", "--sample-every", steps]
    return cmd + ["--sample-n", "4", "--sample-steps", "4"]


def assert_trained(logs: str, name: str, steps: int) -> None:
    assert f"step {steps}/{steps}" in logs
    assert f"latest checkpoint: {RUNS}/{name}/checkpoint-{steps:09d}" in logs  # a URI the next jobs take


def sample_job(env: dict, name: str) -> str:
    sample = ["jobs/sample.py", "--checkpoint", f"{RUNS}/{name}", "--n", "6", "--steps", "4", "--batch-size", "3"]
    return sh(SUBMIT + ["--", "python", *sample, "--out", SAMPLES], env)


def assert_samples_written(s3) -> None:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="samples/e2e/")["Contents"]]
    assert sorted(k for k in keys if k.endswith(".png")) == [
        *(f"samples/e2e/{seed:010d}.png" for seed in range(6)),
        "samples/e2e/samples.png",  # the grid of the first images
    ]
    assert "samples/e2e/sampling.json" in keys


SERVE_BODY = {"n": 2, "seed": 0, "steps": 4}


def assert_two_images(png: bytes) -> None:
    assert Image.open(io.BytesIO(png)).size == (70, 36)  # two 32x32 images in a row, 2-px padding


def assert_tracked(env: dict, monkeypatch, s3, name: str, steps: int) -> None:
    """In MLflow: the training run (one: a resumed run continues its own) FINISHED, with its grid
    at its last step, and the sampling run linked to it; their images in S3."""
    client = mlflow_client(env, monkeypatch)
    runs_found = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    kinds = [r.data.tags["kind"] for r in runs_found]
    assert kinds.count("training") == 1 and kinds.count("sampling") == 1, [r.data.tags for r in runs_found]
    training, sampling = (next(r for r in runs_found if r.data.tags["kind"] == k) for k in ("training", "sampling"))
    assert training.info.status == "FINISHED" and training.data.tags["checkpoint_uri"].startswith(f"{RUNS}/{name}")
    assert training.data.tags["ray_job_id"] and training.data.metrics["replicas_identical"] == 1.0
    assert sampling.data.tags["training_run_id"] == training.info.run_id
    grids = mlflow_images(client, training.info.run_id, "samples")
    assert sorted(grids) == [0, steps], grids  # the EMA grids at their steps, as MLflow images (from 0)
    Image.open(grids[steps]).verify()  # a real PNG, served back by the tracking server
    assert list(mlflow_images(client, sampling.info.run_id, "samples")) == [0]
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="mlflow/")["Contents"]]
    assert sum(k.endswith(".png") for k in stored) >= 2  # the artifacts live in the S3 bucket


def mlflow_client(env: dict, monkeypatch) -> MlflowClient:
    """A client of the stack's MLflow server, with the stack's credentials and settings (MLflow reads
    them from the environment)."""
    for key in [k for k in env if k.startswith("MLFLOW_")]:
        monkeypatch.setenv(key, env[key])
    return MlflowClient(env["MLFLOW_TRACKING_URI"])


def post_until_served(url: str, body: dict, key: str, timeout: float = 180, node: str = "") -> bytes:
    """The PNG of the first answer (from the replica on `node`, when given), polled twice a second."""
    deadline = time.time() + timeout
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    while True:
        request = urllib.request.Request(url, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                assert response.headers["content-type"] == "image/png"
                if not node or response.headers["x-node"] == node:
                    return response.read()
                problem = f"answered by the replica on {response.headers['x-node']}"
        except (urllib.error.URLError, ConnectionError) as e:
            problem = str(e)
        if time.time() > deadline:
            raise AssertionError(f"{url} did not answer{' from ' + node if node else ''} within {timeout} s: {problem}")
        time.sleep(0.5)


# ------------------------------------------------------------------ several hosts, one lost


def test_a_multi_host_up_that_fails_half_way_leaves_nothing(tmp_path):
    """The network is made, then S3 cannot be reached: `up` says so and removes the namespaces,
    links and bridge it made, with nothing recorded."""
    why = namespaces_unavailable()
    if why:
        pytest.skip(f"multi-host check skipped: {why}")
    hosts = cluster_module("hosts")

    before = {link["ifname"] for link in json.loads(hosts.ip("-j", "link").stdout)}
    namespaces = set(hosts.ip("netns", "list").stdout.split())
    cmd = [sys.executable, "cluster/stack.py", "--state-dir", str(tmp_path), "up", "--hosts", "2"]
    cmd += ["--s3-endpoint", "http://127.0.0.1:1"]  # nothing listens there
    env = dict(os.environ, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", AWS_MAX_ATTEMPTS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and "stack up failed, stopping what started" in proc.stderr
    assert {link["ifname"] for link in json.loads(hosts.ip("-j", "link").stdout)} == before
    assert set(hosts.ip("netns", "list").stdout.split()) == namespaces
    assert not (tmp_path / "stack.json").exists() and not (tmp_path / "env").exists()


# The first checkpoint early; the 8 steps after it leave the kill time to land before the run ends.
SPREAD_STEPS, SPREAD_CHECKPOINT_EVERY = 12, 4


def test_two_hosts_end_to_end_with_one_lost_and_back(tmp_path, monkeypatch):
    """up --hosts 2, and on it the end-to-end pipeline: a 2-worker training spread over both hosts
    through `ray job submit`, one host killed after the first checkpoint and brought back (the run
    resumes from S3 and finishes in its MLflow run); from its checkpoint the batch sampling job and
    a Serve replica on each host answering (the head's alone while the other is gone); the runs and
    their images in MLflow with the files in S3; every service refusing a host without
    credentials, no secret in any log, and `down` leaving nothing."""
    why = namespaces_unavailable()
    if why:
        pytest.skip(f"multi-host check skipped: {why}")
    if not SHARED_CIFAR.exists():
        pytest.skip(f"multi-host check skipped: {SHARED_CIFAR} is absent (it exists on developer machines and CI)")
    hosts = cluster_module("hosts")

    state_dir = tmp_path / "stack"
    stack = [sys.executable, "cluster/stack.py", "--state-dir", state_dir]
    folder, out = concurrently(
        lambda: cifar_subset_folder(tmp_path / "images", {"train": 20, "test": 5}),
        lambda: sh(stack + ["up", "--hosts", "2", "--num-cpus", "2"], dict(os.environ, **FAST_HEALTH_CHECKS), 300),
    )
    state = json.loads((state_dir / "stack.json").read_text())
    network = hosts.Network(**state["network"])
    head, worker = network.address(0), network.address(1)
    temp_dirs = [svc["temp_dir"] for svc in state["services"].values() if "temp_dir" in svc]
    try:
        env = stack_env(state_dir)
        assert env["RAY_API_SERVER_ADDRESS"] == f"http://{head}:8265" and not any(
            s in out for s in stack_secrets(state_dir)
        )
        assert (state_dir / "env").stat().st_mode & 0o077 == 0
        status = sh(stack + ["status"], env)
        assert f"host h0  {head}" in status and f"host h1  {worker}" in status and status.count("ALIVE") == 2
        assert status.count("running") == 4  # S3, MLflow and a Ray node a host
        prepare_data(folder, env)
        loss = train_through_a_host_loss(env, stack, worker)
        # From the run's last step on, while its job ends: the batch sampling job, Serve deployed and probed.
        with ThreadPoolExecutor(2) as pool:
            timeline = pool.submit(assert_resumed_run, env, monkeypatch, head, worker, loss)
            sampled = pool.submit(sample_job, env, "spread")
            pngs = serve_on_every_host(env, head, worker)
            outsiders_refused(network, env, head, worker)
            timeline, sampled = timeline.result(), sampled.result()
        (tmp_path / "timeline.json").write_text(json.dumps(timeline, indent=1))
        print("host-loss timeline:", json.dumps(timeline))
        assert "succeeded" in sampled
        s3 = s3_client(env)
        assert_samples_written(s3)
        concurrently(
            lambda: serve_through_a_host_loss(env, stack, head, worker, pngs),
            lambda: assert_tracked(env, monkeypatch, s3, "spread", SPREAD_STEPS),
        )
        state = json.loads((state_dir / "stack.json").read_text())
        temp_dirs = [svc["temp_dir"] for svc in state["services"].values() if "temp_dir" in svc]
        assert_secrets_absent(stack_secrets(state_dir), [*(state_dir / "logs").glob("*.log"), *map(Path, temp_dirs)])
        started = stack_processes(state_dir)
    finally:
        down = subprocess.run([str(c) for c in stack + ["down"]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert network.leftovers(2) == [], "namespaces or links left after down"
    alive = [p for p in started + marked_processes(temp_dirs) if running(p)]
    assert not alive, f"left running after down: {[(p.pid, p.name()) for p in alive]}"
    assert not (state_dir / "stack.json").exists() and not (state_dir / "env").exists()
    # Nothing can listen on the stack's addresses: none is left on this machine. (No connection is
    # tried: with the bridge gone, the default route would carry it out of the machine.)
    assert not any(net.overlaps(ipaddress.ip_network(network.subnet)) for net in hosts.taken_networks())


@dataclass
class HostLoss:
    """What train_through_a_host_loss saw, and when (time.time())."""

    submitted: float
    killed: float
    saved: list[int]  # the steps of the checkpoints in S3 at the kill
    registered: list[int]  # those of them Ray Train had registered
    noticed: float  # the head marked h1's node DEAD
    back: float  # h1's new node joined
    resumed: float
    resumed_from: int


def train_through_a_host_loss(env: dict, stack: list, worker: str) -> HostLoss:
    """The spread run up to its last step: h1 killed once Ray Train has registered the first
    checkpoint and restored once the head marks it DEAD, the run resumed."""
    train = train_args("spread", SPREAD_STEPS, SPREAD_CHECKPOINT_EVERY, workers=2) + ["--placement", "spread"]
    sh(SUBMIT + ["--no-wait", "--submission-id", "spread", "--", "python", *train], env)
    s3 = s3_client(env)
    submitted = time.time()
    wait_until(lambda: registered_checkpoints(s3, "spread"), "the first checkpoint registered", 400, every=0.25)
    killed = time.time()
    sh(stack + ["kill-host", "h1"], env)
    saved, registered = checkpoints(s3, "runs/spread/"), registered_checkpoints(s3, "spread")
    wait_until(
        lambda: cluster_module("stack").ray_nodes(env).get(worker) == "DEAD", "the Ray head marking h1 dead", 120
    )
    noticed = time.time()
    sh(stack + ["restore-host", "h1"], env)
    back = time.time()

    def resumed_line() -> str | None:
        line = log_line(env, "spread", "resumed from checkpoint at step")
        if not line and (job_finished(env, "spread") or log_line(env, "spread", "done at step")):
            raise AssertionError("the run reached its end without a resume: the kill came after its last step")
        return line

    try:
        resumed_from = wait_until(resumed_line, "the resume", 400)
    except AssertionError as e:
        seen = (
            f"first checkpoint registered {killed - submitted:.1f} s after the submit; at the kill, checkpoints "
            f"in S3: {saved}, registered: {registered}"
        )
        raise AssertionError(f"{e} ({seen}); the job's log:\n{jobs_api(env, 'spread/logs')['logs'][-4000:]}") from None
    resumed = time.time()
    ended = wait_until(  # the job's end, or its last step done (the final checkpoint in S3) while the job ends
        lambda: job_finished(env, "spread") or log_line(env, "spread", "done at step"), "the run's last step", 600
    )
    assert ended not in ("FAILED", "STOPPED"), jobs_api(env, "spread/logs")["logs"][-3000:]
    return HostLoss(submitted, killed, saved, registered, noticed, back, resumed, int(resumed_from.rsplit(" ", 1)[1]))


def assert_resumed_run(env: dict, monkeypatch, head: str, worker: str, loss: HostLoss) -> dict:
    """The spread job SUCCEEDED, one worker a host, the replicas identical; it resumed from the last
    checkpoint and finished in its one MLflow run, no credential among the params. The timeline of
    the host loss, in seconds from the kill."""
    status = wait_until(lambda: job_finished(env, "spread"), "the training job's end", 600)
    finished = time.time()
    logs = sh(["ray", "job", "logs", "spread"], env)
    assert status == "SUCCEEDED", logs[-3000:]
    assert f"done at step {SPREAD_STEPS}: 2 replica(s), weights and EMA identical across ranks: True" in logs
    assert_trained(logs, "spread", SPREAD_STEPS)
    placed = [line for line in logs.splitlines() if "2 worker(s) on cpu" in line][-1]  # the resumed run's workers
    assert sorted(re.findall(r"([\d.]+) \(rank \d\)", placed)) == sorted([head, worker]), placed  # one a host

    client = mlflow_client(env, monkeypatch)
    training = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.kind = 'training'")
    assert len(training) == 1 and training[0].info.status == "FINISHED"  # the same run, resumed
    run = training[0]
    losses = client.get_metric_history(run.info.run_id, "loss")
    before = [m.step for m in losses if m.timestamp / 1000 < loss.killed]
    # From the last checkpoint: the last one registered at the kill, or one saved before the kill
    # that the controller registered after it (when it next polled the workers).
    last = f"the last checkpoint (registered at the kill: {loss.registered}, in S3: {loss.saved})"
    assert max(loss.registered) <= loss.resumed_from and loss.resumed_from in loss.saved, (
        f"resumed from step {loss.resumed_from}, not {last}"
    )
    assert max(m.step for m in losses) == SPREAD_STEPS and run.data.metrics["replicas_identical"] == 1.0
    assert not set(run.data.params.values()) & set(secrets_of(env))  # no credential among the params
    return {
        "first_checkpoint_s": round(loss.killed - loss.submitted, 1),
        "killed_at_step": max(before, default=0),
        "noticed_after_s": round(loss.noticed - loss.killed, 1),
        "host_back_after_s": round(loss.back - loss.killed, 1),
        "resumed_after_s": round(loss.resumed - loss.killed, 1),
        "resumed_from_step": loss.resumed_from,
        "steps_redone": max(before, default=0) - loss.resumed_from,
        "finished_after_s": round(finished - loss.killed, 1),
    }


def serve_on_every_host(env: dict, head: str, worker: str) -> dict[str, bytes]:
    """The Serve app from the spread run's checkpoint, a replica on each host answering at its
    host's address with the same PNG (the same weights). The PNGs by host."""
    serve = ["jobs/serve.py", "--checkpoint", f"{RUNS}/spread", "--host", "0.0.0.0", "--replicas", "2"]
    serve += ["--replicas-per-node", "1", "--batch-size", "2", "--detach"]
    assert "succeeded" in sh(SUBMIT + ["--", "python", *serve], env)
    key = env["RAY_DIFFUSION_API_KEY"]
    pngs = {
        node: post_until_served(f"http://{node}:8000/v1/samples", SERVE_BODY, key, node=node) for node in (head, worker)
    }
    assert pngs[head] == pngs[worker]
    assert_two_images(pngs[head])
    return pngs


def serve_through_a_host_loss(env: dict, stack: list, head: str, worker: str, pngs: dict[str, bytes]) -> None:
    """The head's replica alone answering while the worker host is gone; the worker's again once it is back."""
    key = env["RAY_DIFFUSION_API_KEY"]
    sh(stack + ["kill-host", "h1"], env)
    assert post_until_served(f"http://{head}:8000/v1/samples", SERVE_BODY, key, timeout=60, node=head) == pngs[head]
    sh(stack + ["restore-host", "h1"], env)
    assert (
        post_until_served(f"http://{worker}:8000/v1/samples", SERVE_BODY, key, timeout=240, node=worker) == pngs[head]
    )


OUTSIDER = """
import json, os, subprocess, sys, urllib.error, urllib.request
import boto3
from botocore.exceptions import ClientError

head, worker, token = sys.argv[1], sys.argv[2], sys.argv[3]

def status(url, data=None, headers={}):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=20).status
    except urllib.error.HTTPError as e:
        return e.code

def s3_error(key_id, secret):
    s3 = boto3.client("s3", endpoint_url=f"http://{head}:9000", aws_access_key_id=key_id,
                      aws_secret_access_key=secret, region_name="us-east-1")
    try:
        s3.list_objects_v2(Bucket="ray-diffusion")
        return "allowed"
    except ClientError as e:
        return e.response["Error"]["Code"]

env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
gcs = subprocess.run(["ray", "status", "--address", f"{head}:6379"], capture_output=True, text=True, timeout=120,
                     env=dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64))
sample = json.dumps({"n": 1, "seed": 0, "steps": 4}).encode()
print(json.dumps({
    "jobs": status(f"http://{head}:8265/api/jobs/"),
    "jobs_with_token": status(f"http://{head}:8265/api/jobs/", headers={"Authorization": f"Bearer {token}"}),
    "gcs": [gcs.returncode, "InvalidAuthToken" in gcs.stdout + gcs.stderr],
    "mlflow": status(f"http://{head}:5000/api/2.0/mlflow/experiments/search?max_results=1"),
    "s3_unsigned": status(f"http://{head}:9000/ray-diffusion"),
    "s3_unknown_key": s3_error("AKIAOUTSIDER00000000", "x" * 40),
    "s3_moto_api": status(f"http://{head}:9000/moto-api/data.json"),
    "serve": [status(f"http://{h}:8000/v1/samples", sample, {"content-type": "application/json"}) for h in (head, worker)],
}))
"""


def outsiders_refused(network, env: dict, head: str, worker: str) -> None:
    """From a third host on the same bridge, without the stack's credentials, every service refuses."""
    outsider = 50
    network.add_host(outsider)
    try:
        token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        clean = {k: v for k, v in env.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
        hosts = cluster_module("hosts")

        cmd = hosts.in_namespace(network.namespace(outsider), [sys.executable, "-c", OUTSIDER, head, worker, token])
        proc = subprocess.run(
            cmd, env=dict(clean, HOME=str(ROOT / ".no-home")), capture_output=True, text=True, timeout=300
        )
    finally:
        network.remove_host(outsider)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {
        "jobs": 401,
        "jobs_with_token": 200,  # the network reaches it: the token is what decides
        "gcs": [1, True],
        "mlflow": 401,
        "s3_unsigned": 403,
        "s3_unknown_key": "InvalidAccessKeyId",
        "s3_moto_api": 403,
        "serve": [401, 401],
    }, seen


def assert_secrets_absent(secrets: list[str], paths: list[Path]) -> None:
    """No credential in any file under `paths` (the stack's logs, every host's Ray temp dir)."""
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file() and not f.is_symlink()]
    for f in files:
        if f.stat().st_size < 50_000_000 and "sockets" not in f.parts:
            data = f.read_bytes()
            found = [s[:4] + "..." for s in secrets if s.encode() in data]
            assert not found, f"credentials {found} written to {f}"


def s3_client(env: dict):
    session = boto3.Session(
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"]
    )
    return session.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])


def checkpoints(s3, prefix: str) -> list[int]:
    """The steps of the checkpoints under `prefix`."""
    objects = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return [int(o["Key"].split("checkpoint-")[1].split("/")[0]) for o in objects if o["Key"].endswith("/checkpoint.pt")]


def registered_checkpoints(s3, run: str) -> list[int]:
    """The steps of the checkpoints Ray Train has registered for `run`: its controller records each
    in this snapshot when it next polls the workers, and a restarted run resumes from these only."""
    key = f"runs/{run}/checkpoint_manager_snapshot.json"
    try:
        snapshot = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    except s3.exceptions.NoSuchKey:
        return []
    return [int(result["checkpoint_dir_name"].split("-")[1]) for result in snapshot["checkpoint_results"]]


def jobs_api(env: dict, path: str) -> dict:
    """GET the Jobs API (what `ray job status` and `ray job logs` ask) with the stack's token:
    polled without starting a Ray CLI process each time."""
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    url = f"{env['RAY_API_SERVER_ADDRESS']}/api/jobs/{path}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def log_line(env: dict, job: str, text: str) -> str | None:
    lines = [line for line in jobs_api(env, f"{job}/logs")["logs"].splitlines() if text in line]
    return lines[-1].strip() if lines else None


def job_finished(env: dict, job: str) -> str | None:
    status = jobs_api(env, job)["status"]
    return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None


def wait_until(probe, what: str, timeout: float, every: float = 0.5):
    """probe()'s first truthy value, polled every `every` s; fails naming `what` after `timeout` s."""
    deadline = time.time() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(every)
