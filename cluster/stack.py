"""A local stack on 127.0.0.1: a Ray head, an S3-compatible endpoint and an MLflow tracking
server that keeps its artifacts in that S3 bucket -- the shape of a real cluster on one machine.

    python cluster/stack.py up                  # start all three; prints the addresses
    source .stack/env                           # or: eval "$(python cluster/stack.py env)"
    ray job submit --working-dir . -- python jobs/train.py --preset tiny --data s3://ray-diffusion/data/cifar10 ...
    python cluster/stack.py status
    python cluster/stack.py down                # stops exactly what `up` started

The S3 endpoint is moto's server (`pip install -e ".[stack]"`), in memory: its objects are
gone after `down`. `--s3-endpoint URL` uses a store of your own (MinIO, ...) instead, with
credentials from your environment. Ray jobs inherit the head's environment, so jobs reach
S3 and MLflow without a runtime_env. State, logs and MLflow's sqlite file live in
`--state-dir` (default .stack).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from diffusion.platform.cli import HelpFormatter
from diffusion.platform.net import free_port, port_in_use, wait_for_http

REGION = "us-east-1"
STATE_FILE = "stack.json"


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `url` until it answers; fail with the service's log if it exits or times out."""
    try:
        wait_for_http(url, timeout, proc)
    except (TimeoutError, ChildProcessError) as e:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"{e}; the end of {log}:\n{tail}") from None


class Stack:
    """The services of one stack, recorded in <state_dir>/stack.json as each one starts, so that
    `down` stops them even after an `up` that failed half-way."""

    def __init__(self, state_dir: Path):
        self.dir = state_dir.resolve()
        self.state_path = self.dir / STATE_FILE
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"services": {}}

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.state_path)

    def start(self, name: str, cmd: list[str], env: dict, **record) -> subprocess.Popen:
        log = self.dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            # Its own session: a Ctrl-C in this shell does not reach it.
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.state["services"][name] = {"pid": proc.pid, "started": process_start(proc.pid), "log": str(log), **record}
        self.save()
        return proc

    def running(self) -> dict[str, bool]:
        return {name: same_process(svc) is not None for name, svc in self.state["services"].items()}


def process_start(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()


def alive(proc) -> bool:
    """Whether a psutil.Process still runs (a zombie has exited)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def same_process(svc: dict):
    """The psutil.Process the stack started (not a later process that reuses its PID), or None."""
    import psutil

    try:
        proc = psutil.Process(svc["pid"])
        return proc if abs(proc.create_time() - svc["started"]) < 1e-3 and alive(proc) else None
    except psutil.NoSuchProcess:
        return None


def stop_service(svc: dict, marker: str | None, timeout: float = 60) -> None:
    """SIGTERM the service and wait; then SIGKILL whatever of it is left, until nothing is: its
    descendants and (for Ray) every process whose command line names its temp dir, including
    workers that were still starting while it stopped."""
    import psutil

    def marked() -> list[psutil.Process]:
        if not marker:
            return []
        return [p for p in psutil.process_iter(["cmdline"]) if any(marker in a for a in p.info["cmdline"] or [])]

    leader = same_process(svc)
    procs = [leader, *leader.children(recursive=True)] if leader else []
    if leader:
        leader.terminate()
        try:
            leader.wait(timeout)
        except psutil.TimeoutExpired:
            pass
    for _ in range(10):
        procs = [p for p in procs + marked() if alive(p)]
        if not procs:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=5)


def env_lines(state: dict) -> list[str]:
    return [f"export {key}={value}" for key, value in state["client_env"].items()]


def cmd_up(args) -> int:
    stack = Stack(Path(args.state_dir))
    if stack.state["services"]:
        if any(stack.running().values()):
            print(f"a stack from {stack.dir} is already running: `python cluster/stack.py down` first", file=sys.stderr)
            return 1
        stop_all(stack)  # a stale record from a crashed stack: clean up what is left of it

    ports = {"--ray-port": args.ray_port, "--dashboard-port": args.dashboard_port, "--mlflow-port": args.mlflow_port}
    if not args.s3_endpoint:
        ports["--s3-port"] = args.s3_port
    for flag, port in ports.items():
        if port_in_use(port):
            print(
                f"port {port} ({flag}) is in use on 127.0.0.1: stop what holds it or pass another {flag}",
                file=sys.stderr,
            )
            return 1
    for tool in ("ray", "mlflow", *(() if args.s3_endpoint else ("moto_server",))):
        if not shutil.which(tool, path=bin_path()):
            extra = '".[stack]"' if tool == "moto_server" else "."
            print(f"`{tool}` is not installed: pip install -e {extra} (or pass --s3-endpoint)", file=sys.stderr)
            return 1

    try:
        start_all(stack, args)
    except (Exception, KeyboardInterrupt) as e:
        print(f"stack up failed, stopping what started: {e!r}", file=sys.stderr)
        stop_all(stack)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    print_summary(stack)
    return 0


def bin_path() -> str:
    """The PATH whose first entry holds this interpreter's tools (ray, mlflow): a job's `python` is the head's."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def start_all(stack: Stack, args) -> None:
    base = dict(os.environ, PATH=bin_path())
    if args.s3_endpoint:
        s3_env = {"AWS_ENDPOINT_URL": args.s3_endpoint}  # credentials: the caller's environment
    else:
        # moto accepts any credentials: fresh ones per stack, kept only in the 0600 env file.
        s3_env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{args.s3_port}",
            "AWS_ACCESS_KEY_ID": f"stack{secrets.token_hex(8)}",
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
            "AWS_DEFAULT_REGION": REGION,
        }
        proc = stack.start("s3", ["moto_server", "-H", "127.0.0.1", "-p", str(args.s3_port)], base, port=args.s3_port)
        wait_http(s3_env["AWS_ENDPOINT_URL"], proc, stack.dir / "logs" / "s3.log", 60)
    base.update(s3_env)
    create_bucket(args.bucket, base)

    mlflow_uri = f"http://127.0.0.1:{args.mlflow_port}"
    backend = args.backend_store_uri or f"sqlite:///{stack.dir / 'mlflow.db'}"
    mlflow_cmd = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(args.mlflow_port), "--workers", "1"]
    mlflow_cmd += ["--backend-store-uri", backend, "--artifacts-destination", f"s3://{args.bucket}/mlflow"]
    mlflow_env = dict(
        base, MLFLOW_S3_ENDPOINT_URL=s3_env["AWS_ENDPOINT_URL"], MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"
    )
    proc = stack.start("mlflow", mlflow_cmd, mlflow_env, port=args.mlflow_port)
    wait_http(f"{mlflow_uri}/health", proc, stack.dir / "logs" / "mlflow.log", 120)

    # Ray's socket paths have a length limit: a short temp dir, removed by `down`.
    temp_dir = tempfile.mkdtemp(prefix="rds-", dir="/tmp")
    ray_cmd = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={args.ray_port}"]
    ray_cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={args.dashboard_port}", f"--temp-dir={temp_dir}"]
    ray_cmd += [f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    ray_cmd += [f"--num-cpus={args.num_cpus}"] if args.num_cpus is not None else []
    ray_cmd += [f"--num-gpus={args.num_gpus}"] if args.num_gpus is not None else []
    ray_env = dict(
        base,
        MLFLOW_TRACKING_URI=mlflow_uri,  # jobs inherit the head's environment
        RAY_AUTH_MODE="disabled",  # the dashboard/jobs API listens on 127.0.0.1 only
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    ray_env.pop("RAY_ADDRESS", None)
    dashboard = f"http://127.0.0.1:{args.dashboard_port}"
    proc = stack.start(
        "ray", ray_cmd, ray_env, port=args.ray_port, dashboard_port=args.dashboard_port, temp_dir=temp_dir
    )
    wait_http(f"{dashboard}/api/version", proc, stack.dir / "logs" / "ray.log", 180)

    stack.state["client_env"] = {
        "RAY_ADDRESS": f"127.0.0.1:{args.ray_port}",  # ray.init() in this shell joins the stack
        "RAY_API_SERVER_ADDRESS": dashboard,  # ray job ...
        "RAY_DASHBOARD_ADDRESS": dashboard,  # serve deploy / status
        "RAY_AUTH_MODE": "disabled",
        "MLFLOW_TRACKING_URI": mlflow_uri,
        **s3_env,
    }
    stack.state["bucket"] = args.bucket
    stack.save()
    env_file = stack.dir / "env"
    env_file.touch(mode=0o600)
    env_file.chmod(0o600)
    env_file.write_text("\n".join(env_lines(stack.state)) + "\n")


def create_bucket(bucket: str, env: dict) -> None:
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        region_name=env.get("AWS_DEFAULT_REGION", REGION),
    )
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket)


def print_summary(stack: Stack) -> None:
    env, svc = stack.state["client_env"], stack.state["services"]
    print(f"Ray head      {env['RAY_ADDRESS']}  (dashboard and jobs API {env['RAY_API_SERVER_ADDRESS']})")
    print(
        f"S3 endpoint   {env['AWS_ENDPOINT_URL']}  bucket s3://{stack.state['bucket']}"
        + ("" if "s3" in svc else "  (yours)")
    )
    print(f"MLflow        {env['MLFLOW_TRACKING_URI']}  (artifacts in s3://{stack.state['bucket']}/mlflow)")
    print(f"logs          {stack.dir / 'logs'}")
    print(f"\nExport the environment (it holds the stack's S3 credentials):\n  source {stack.dir / 'env'}")


def stop_all(stack: Stack) -> None:
    for name in ("ray", "mlflow", "s3"):  # clients before the services they use
        svc = stack.state["services"].get(name)
        if svc:
            stop_service(svc, svc.get("temp_dir"))
            if svc.get("temp_dir"):
                shutil.rmtree(svc["temp_dir"], ignore_errors=True)
    stack.state_path.unlink(missing_ok=True)
    (stack.dir / "env").unlink(missing_ok=True)


def cmd_down(args) -> int:
    stack = Stack(Path(args.state_dir))
    if not stack.state["services"]:
        print(f"no stack recorded in {stack.dir}")
        return 0
    ports = [svc[key] for svc in stack.state["services"].values() for key in ("port", "dashboard_port") if key in svc]
    stop_all(stack)
    busy = [port for port in ports if port_in_use(port)]
    if busy:
        print(f"stopped the stack, but ports {busy} still answer: something else holds them", file=sys.stderr)
        return 1
    print("stack stopped")
    return 0


def cmd_status(args) -> int:
    stack = Stack(Path(args.state_dir))
    if not stack.state["services"]:
        print(f"no stack recorded in {stack.dir}")
        return 3
    running = stack.running()
    for name, svc in stack.state["services"].items():
        print(f"{name:8s} pid {svc['pid']:<8d} port {svc['port']:<6d} {'running' if running[name] else 'STOPPED'}")
    return 0 if all(running.values()) else 1


def cmd_env(args) -> int:
    stack = Stack(Path(args.state_dir))
    if "client_env" not in stack.state:
        print(f"no running stack recorded in {stack.dir}: python cluster/stack.py up", file=sys.stderr)
        return 1
    print("\n".join(env_lines(stack.state)))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--state-dir", default=".stack", help="where the stack keeps its state, logs and env file")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "up", help="start the Ray head, the S3 endpoint and the MLflow server", formatter_class=HelpFormatter
    )
    up.add_argument("--ray-port", type=int, default=6379, help="Ray GCS port (RAY_ADDRESS)")
    up.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard and jobs API port")
    up.add_argument("--s3-port", type=int, default=9000, help="port of the S3 endpoint the stack starts")
    up.add_argument("--s3-endpoint", help="use this S3-compatible endpoint instead of starting one")
    up.add_argument("--bucket", default="ray-diffusion", help="bucket for data, runs, samples and MLflow artifacts")
    up.add_argument("--mlflow-port", type=int, default=5000, help="MLflow tracking server port")
    up.add_argument("--backend-store-uri", help="MLflow backend store (default: sqlite in the state dir)")
    up.add_argument("--num-cpus", type=int, help="CPUs the Ray head offers (default: all)")
    up.add_argument("--num-gpus", type=int, help="GPUs the Ray head offers (default: all)")
    sub.add_parser("down", help="stop exactly what `up` started")
    sub.add_parser("status", help="which services are running (exit 0 when all are)")
    sub.add_parser("env", help="print the export lines for this stack")
    args = p.parse_args(argv)
    return {"up": cmd_up, "down": cmd_down, "status": cmd_status, "env": cmd_env}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
