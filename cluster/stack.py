"""A cluster's shape on one machine: Ray nodes, an S3-compatible endpoint and an MLflow tracking
server that keeps its artifacts in that S3 bucket, every service authenticated.

    python cluster/stack.py up                  # one host: everything on 127.0.0.1
    python cluster/stack.py up --hosts 3        # three hosts, each its own address (needs root)
    source .stack/env                           # addresses and credentials (a 0600 file)
    ray job submit --working-dir . -- python jobs/train.py --preset tiny --data s3://ray-diffusion/data/cifar10 ...
    python cluster/stack.py status              # the services, and each host's Ray node
    python cluster/stack.py kill-host h1        # lose a worker host (every process of it, SIGKILL) ...
    python cluster/stack.py restore-host h1     # ... and bring it back, as an autoscaler replaces a node
    python cluster/stack.py down                # stops and removes exactly what `up` made

With --hosts N each host is a Linux network namespace on a private bridge (cluster/hosts.py),
with its own loopback, address, working directory and Ray temp dir; the head host (h0) also runs
the S3 endpoint and MLflow, bound to its address, which the machine's own shell reaches over the
bridge. Authentication: Ray's token (a 0600 file, RAY_AUTH_MODE=token) for the GCS, the
dashboard and the Jobs API; MLflow's basic-auth app; S3 signed with the stack's key pair; and an
API key for the Serve endpoint (RAY_DIFFUSION_API_KEY). Every secret is drawn per stack and
written only to the 0600 files of the state dir: never on a command line, in a log or in MLflow.

Every Ray node starts with the stack's environment (S3 endpoint and keys, MLflow URI and
credentials), so jobs reach S3 and MLflow without a runtime_env. The S3 endpoint is moto
(`pip install -e ".[stack]"`), in memory: its objects are gone after `down`; `--s3-endpoint URL`
uses a store of your own instead, with credentials from your environment.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hosts

from diffusion.platform.cli import HelpFormatter, parser
from diffusion.platform.net import free_port, port_in_use, wait_for_http

REGION = "us-east-1"
STATE_FILE = "stack.json"
HERE = Path(__file__).resolve().parent
SECRET_FILES = ("env", "ray-token", "mlflow-auth.ini", "mlflow-auth.db")


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `url` until it answers; fail with the service's log if it exits or times out."""
    try:
        wait_for_http(url, timeout, proc)
    except (TimeoutError, ChildProcessError) as e:
        raise RuntimeError(f"{e}; the end of {log}:\n{log_tail(log)}") from None


def wait_port(address: str, port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll until `address:port` accepts a connection; fail with the service's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            s.settimeout(2)
            if s.connect_ex((address, port)) == 0:
                return
        exited = proc.poll() is not None
        if exited or time.monotonic() > deadline:
            why = f"exited with code {proc.returncode}" if exited else f"not open within {timeout:.0f} s"
            raise RuntimeError(f"{address}:{port} {why}; the end of {log}:\n{log_tail(log)}")
        time.sleep(0.25)


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else ""


def private_file(path: Path, text: str) -> None:
    """`text` in a file only its owner reads (created 0600, never wider for a moment)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class Stack:
    """The services of one stack, recorded in <state_dir>/stack.json as each one starts (and the
    network before it is made), so that `down` removes them even after an `up` that failed
    half-way."""

    def __init__(self, state_dir: Path):
        self.dir = state_dir.resolve()
        self.state_path = self.dir / STATE_FILE
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"services": {}}

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)  # it holds the credentials
        tmp = self.state_path.with_suffix(".tmp")
        private_file(tmp, json.dumps(self.state, indent=2))  # its client_env holds the credentials
        tmp.replace(self.state_path)

    @property
    def network(self) -> hosts.Network | None:
        return hosts.Network(**self.state["network"]) if "network" in self.state else None

    @property
    def hosts(self) -> int:
        return self.state.get("hosts", 1)

    def address(self, host: int) -> str:
        return self.network.address(host) if self.network else "127.0.0.1"

    def start(self, name: str, cmd: list[str], env: dict, host: int = 0, **record) -> subprocess.Popen:
        """Start `cmd` on `host` (inside its namespace, in its working directory) and record it."""
        log = self.dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cwd = self.dir / "hosts" / f"h{host}"
        cwd.mkdir(parents=True, exist_ok=True)
        if self.network:
            cmd = hosts.in_namespace(self.network.namespace(host), cmd)
        with open(log, "ab") as out:
            # Its own session: a Ctrl-C in this shell does not reach it.
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.state["services"][name] = {
            "pid": proc.pid,
            "started": process_start(proc.pid),
            "log": str(log),
            "host": host,
            **record,
        }
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


def stop_and_remove(svc: dict) -> None:
    """stop_service, then remove its temp dir (a Ray node's)."""
    stop_service(svc, svc.get("temp_dir"))
    if svc.get("temp_dir"):
        shutil.rmtree(svc["temp_dir"], ignore_errors=True)


def env_lines(state: dict) -> list[str]:
    return [f"export {key}={value}" for key, value in state["client_env"].items()]


def cmd_up(args) -> int:
    stack = Stack(Path(args.state_dir))
    if stack.state["services"] or "network" in stack.state:
        if any(stack.running().values()):
            print(f"a stack from {stack.dir} is already running: `python cluster/stack.py down` first", file=sys.stderr)
            return 1
        stop_all(stack)  # a stale record from a crashed stack: clean up what is left of it
        stack = Stack(Path(args.state_dir))

    if args.hosts > 1:
        try:
            hosts.check_possible()
        except hosts.NamespaceError as e:
            print(f"--hosts {args.hosts} cannot run here: {e}; --hosts 1 runs the stack on 127.0.0.1", file=sys.stderr)
            return 1
    else:  # on 127.0.0.1 the ports are this machine's; each host of --hosts N has ports of its own
        ports = {
            "--ray-port": args.ray_port,
            "--dashboard-port": args.dashboard_port,
            "--mlflow-port": args.mlflow_port,
        }
        if not args.s3_endpoint:
            ports["--s3-port"] = args.s3_port
        for flag, port in ports.items():
            if port_in_use(port):
                print(
                    f"port {port} ({flag}) is in use on 127.0.0.1: stop what holds it or pass another {flag}",
                    file=sys.stderr,
                )
                return 1
    for tool in ("ray", "mlflow"):
        if not shutil.which(tool, path=bin_path()):
            print(f"`{tool}` is not installed: pip install -e .", file=sys.stderr)
            return 1
    missing = [m for m in ("moto", "flask_wtf") if not module_available(m)]
    if missing and not (args.s3_endpoint and missing == ["moto"]):
        print(f"{', '.join(missing)} not installed: pip install -e '.[stack]'", file=sys.stderr)
        return 1

    try:
        start_all(stack, args)
    except (Exception, KeyboardInterrupt) as e:
        print(f"stack up failed, stopping what started: {e!r}", file=sys.stderr)
        stop_all(stack)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    print_summary(stack)
    return 0


def module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def bin_path() -> str:
    """The PATH whose first entry holds this interpreter's tools (ray, mlflow): a job's `python` is the head's."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def start_all(stack: Stack, args) -> None:
    stack.state["hosts"] = args.hosts
    if args.hosts > 1:
        network = hosts.Network.new()
        stack.state["network"] = network.to_dict()  # recorded first: `down` removes it even half-made
        stack.save()
        network.create()
        for i in range(args.hosts):
            network.add_host(i)
    stack.save()
    head = stack.address(0)
    base = dict(os.environ, PATH=bin_path())
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI"):
        base.pop(key, None)

    services_env = start_s3(stack, args, base, head)
    mlflow_env, mlflow = start_mlflow(stack, args, base, head)  # it gets ready while Ray starts
    services_env.update(mlflow_env)
    token_path = stack.dir / "ray-token"
    private_file(token_path, secrets.token_hex(32))
    dashboard = f"http://{head}:{args.dashboard_port}"
    client_env = {
        "RAY_ADDRESS": f"{head}:{args.ray_port}",  # ray.init() in this shell joins the stack
        "RAY_API_SERVER_ADDRESS": dashboard,  # ray job ...
        "RAY_DASHBOARD_ADDRESS": dashboard,  # serve deploy / status
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        **services_env,
        "RAY_DIFFUSION_API_KEY": secrets.token_urlsafe(24),  # the Serve endpoint's, off loopback
    }
    stack.state["client_env"] = client_env
    stack.state["bucket"] = args.bucket
    stack.state["ray"] = {
        "port": args.ray_port,
        "dashboard_port": args.dashboard_port,
        "num_cpus": args.num_cpus,
        "num_gpus": args.num_gpus,
    }
    stack.save()
    private_file(stack.dir / "env", "\n".join(env_lines(stack.state)) + "\n")

    proc = start_ray_node(stack, 0)
    wait_port(head, args.ray_port, proc, stack.dir / "logs" / "ray.log", 180)  # the GCS: nodes can join
    for i in range(1, args.hosts):
        start_ray_node(stack, i)
    wait_http(f"{dashboard}/api/version", proc, stack.dir / "logs" / "ray.log", 180)
    wait_http(f"{services_env['MLFLOW_TRACKING_URI']}/health", mlflow, stack.dir / "logs" / "mlflow.log", 120)
    wait_for_nodes(stack, range(args.hosts), 180)


def start_s3(stack: Stack, args, base: dict, head: str) -> dict:
    """The S3 endpoint (unless --s3-endpoint) and the bucket; the S3 part of the client environment."""
    if args.s3_endpoint:
        s3_env = {"AWS_ENDPOINT_URL": args.s3_endpoint}  # credentials: the caller's environment
    else:
        s3_env = {
            "AWS_ENDPOINT_URL": f"http://{head}:{args.s3_port}",
            "AWS_ACCESS_KEY_ID": f"AKIA{secrets.token_hex(8).upper()}",
            "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
            "AWS_DEFAULT_REGION": REGION,
        }
        cmd = [sys.executable, str(HERE / "s3_server.py"), "--host", head, "--port", str(args.s3_port)]
        proc = stack.start("s3", cmd, dict(base, **s3_env), port=args.s3_port)
        wait_http(s3_env["AWS_ENDPOINT_URL"], proc, stack.dir / "logs" / "s3.log", 60)
    base.update(s3_env)
    create_bucket(args.bucket, base)
    return s3_env


def start_mlflow(stack: Stack, args, base: dict, head: str) -> tuple[dict, subprocess.Popen]:
    """MLflow's tracking server with its basic-auth app, artifacts proxied to the bucket, started
    (ready once {MLFLOW_TRACKING_URI}/health answers); the MLflow part of the client environment."""
    password = secrets.token_urlsafe(24)
    auth_db = stack.dir / "mlflow-auth.db"
    auth_db.unlink(missing_ok=True)  # the admin is made on first start: with this stack's password
    auth_config = stack.dir / "mlflow-auth.ini"
    private_file(
        auth_config,
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{auth_db}\nadmin_username = stack\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # A checked password is remembered for 10 minutes: each check is a scrypt hash (about 0.1
        # CPU-s on a Zen 4 core), which on every request was most of the server's CPU while a run
        # logged. The stack has one user, whose password never changes while it runs.
        "auth_cache_ttl_seconds = 600\n",
    )
    uri = f"http://{head}:{args.mlflow_port}"
    backend = args.backend_store_uri or base.get("MLFLOW_BACKEND_STORE_URI")
    if not backend:
        backend = f"sqlite:///{stack.dir / 'mlflow.db'}"
        if not args.s3_endpoint:  # its runs' artifacts live in the S3 endpoint's memory: `down` removes both
            stack.state["mlflow_db"] = str(stack.dir / "mlflow.db")
    cmd = ["mlflow", "server", "--app-name", "basic-auth", "--host", head, "--port", str(args.mlflow_port)]
    cmd += ["--workers", "1", "--artifacts-destination", f"s3://{args.bucket}/mlflow"]
    env = dict(
        base,
        MLFLOW_BACKEND_STORE_URI=backend,  # not on the command line: a database URI may hold a password
        MLFLOW_S3_ENDPOINT_URL=base["AWS_ENDPOINT_URL"],
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_AUTH_CONFIG_PATH=str(auth_config),
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
    )
    proc = stack.start("mlflow", cmd, env, port=args.mlflow_port)
    client_env = {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_TRACKING_USERNAME": "stack",
        "MLFLOW_TRACKING_PASSWORD": password,
        # MLflow clients would fetch S3 artifacts straight from the bucket by presigned URLs, which
        # the stack's S3 endpoint cannot check (moto verifies signed headers only): through the server.
        "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
        "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
    }
    return client_env, proc


def service_name(host: int) -> str:
    return "ray" if host == 0 else f"ray-h{host}"


def start_ray_node(stack: Stack, host: int) -> subprocess.Popen:
    """Host 0's Ray head, or a worker node of host `host` joining it, with the stack's environment
    (jobs inherit it) and a temp dir of its own (short: Ray's socket paths have a length limit)."""
    ray, address = stack.state["ray"], stack.address(host)
    temp_dir = tempfile.mkdtemp(prefix=f"rds-h{host}-", dir="/tmp")
    cmd = ["ray", "start", "--block", f"--node-ip-address={address}", f"--temp-dir={temp_dir}"]
    if host == 0:
        cmd += ["--head", f"--port={ray['port']}", f"--dashboard-host={address}"]
        cmd += [f"--dashboard-port={ray['dashboard_port']}", f"--ray-client-server-port={free_port()}"]
    else:
        cmd += [f"--address={stack.address(0)}:{ray['port']}"]
    cmd += [f"--dashboard-agent-listen-port={free_port()}"]
    cmd += [f"--num-cpus={ray['num_cpus']}"] if ray["num_cpus"] is not None else []
    cmd += [f"--num-gpus={ray['num_gpus']}"] if ray["num_gpus"] is not None else []
    env = dict(os.environ, PATH=bin_path(), **stack.state["client_env"], RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    if stack.network:  # the hosts share one hostname: torch.distributed finds its address by interface
        env.update(GLOO_SOCKET_IFNAME="eth0", NCCL_SOCKET_IFNAME="eth0")
    port = ray["port"] if host == 0 else None
    return stack.start(
        service_name(host), cmd, env, host, temp_dir=temp_dir, port=port, dashboard_port=port and ray["dashboard_port"]
    )


def ray_nodes(env: dict) -> dict[str, str]:
    """Each Ray node's address and state (ALIVE, DEAD) as the head's dashboard reports them, asked
    with a stack's client environment `env`."""
    request = urllib.request.Request(
        f"{env['RAY_API_SERVER_ADDRESS']}/api/v0/nodes?limit=1000&detail=false",
        headers={"Authorization": f"Bearer {Path(env['RAY_AUTH_TOKEN_PATH']).read_text().strip()}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        nodes = json.load(response)["data"]["result"]["result"]
    states: dict[str, str] = {}
    for node in sorted(nodes, key=lambda n: n["state"] == "ALIVE"):  # a returned host's live node wins
        states[node["node_ip"]] = node["state"]
    return states


def node_state(stack: Stack, states: dict[str, str], host: int) -> str:
    """Host `host`'s Ray node state in `states` (ray_nodes). On one host, Ray reports the machine's
    own address for the node, whatever --node-ip-address says: its one node is the host's."""
    if stack.network:
        return states.get(stack.address(host), "none")
    return next(iter(sorted(states.values())), "none")  # "ALIVE" sorts first


def wait_for_nodes(stack: Stack, host_ids, timeout: float) -> None:
    """Wait until every host of `host_ids` has an ALIVE Ray node; fail with the node's log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            states = ray_nodes(stack.state["client_env"])
        except OSError:
            states = {}
        missing = [i for i in host_ids if node_state(stack, states, i) != "ALIVE"]
        if not missing:
            return
        for i in missing:
            svc = stack.state["services"][service_name(i)]
            if same_process(svc) is None or time.monotonic() > deadline:
                why = "exited" if same_process(svc) is None else f"did not join within {timeout:.0f} s"
                raise RuntimeError(
                    f"the Ray node of host h{i} {why}; the end of {svc['log']}:\n{log_tail(Path(svc['log']))}"
                )
        time.sleep(1)


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
    print(f"Ray head      {env['RAY_ADDRESS']}  (dashboard and jobs API {env['RAY_API_SERVER_ADDRESS']}, token auth)")
    print(
        f"S3 endpoint   {env['AWS_ENDPOINT_URL']}  bucket s3://{stack.state['bucket']}"
        + ("" if "s3" in svc else "  (yours)")
    )
    print(f"MLflow        {env['MLFLOW_TRACKING_URI']}  (basic auth; artifacts in s3://{stack.state['bucket']}/mlflow)")
    for i in range(stack.hosts):
        print(f"host h{i}       {stack.address(i)}  {'head, S3, MLflow' if i == 0 else 'Ray worker node'}")
    print(f"logs          {stack.dir / 'logs'}")
    print(f"\nExport the environment (it holds the stack's credentials):\n  source {stack.dir / 'env'}")


def stop_all(stack: Stack) -> str | None:
    """Stop every recorded service (the Ray nodes first, at once: clients before the services they
    use; then MLflow and S3), then remove the network, the stack's secrets and an MLflow store whose
    artifacts were in the S3 endpoint's memory (its path, if one was removed)."""
    services = stack.state["services"]
    ray_nodes = [svc for name, svc in services.items() if name.startswith("ray")]
    for group in (ray_nodes, [services[name] for name in ("mlflow", "s3") if name in services]):
        with ThreadPoolExecutor(max(1, len(group))) as pool:
            list(pool.map(stop_and_remove, group))
    if stack.network:
        stack.network.remove(stack.hosts)
    mlflow_db = stack.state.get("mlflow_db")
    if mlflow_db:
        Path(mlflow_db).unlink(missing_ok=True)
    stack.state_path.unlink(missing_ok=True)
    for name in SECRET_FILES:
        (stack.dir / name).unlink(missing_ok=True)
    return mlflow_db


def cmd_down(args) -> int:
    stack = Stack(Path(args.state_dir))
    if not stack.state["services"] and "network" not in stack.state:
        print(f"no stack recorded in {stack.dir}")
        return 0
    network, count = stack.network, stack.hosts
    ports = [svc[key] for svc in stack.state["services"].values() for key in ("port", "dashboard_port") if svc.get(key)]
    mlflow_db = stop_all(stack)
    if mlflow_db:
        print(f"removed {mlflow_db}: the S3 endpoint's objects, its runs' artifacts and checkpoints, are gone with it")
    if network:
        left = network.leftovers(count)
        if left:
            print(f"stopped the stack, but {left} could not be removed", file=sys.stderr)
            return 1
    else:
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
        port = svc.get("port") or "-"
        state = "running" if running[name] else "STOPPED"
        print(f"{name:8s} host h{svc.get('host', 0)}  pid {svc['pid']:<8d} port {port!s:<6s} {state}")
    try:
        nodes = ray_nodes(stack.state["client_env"])
    except (OSError, KeyError) as e:
        nodes, why = {}, f" (the head does not answer: {e})"
    else:
        why = ""
    for i in range(stack.hosts):
        print(f"host h{i}  {stack.address(i):15s} Ray node {node_state(stack, nodes, i)}{why}")
    return 0 if all(running.values()) else 1


def cmd_env(args) -> int:
    stack = Stack(Path(args.state_dir))
    if "client_env" not in stack.state:
        print(f"no running stack recorded in {stack.dir}: python cluster/stack.py up", file=sys.stderr)
        return 1
    print("\n".join(env_lines(stack.state)))
    return 0


def host_index(stack: Stack, name: str) -> int:
    ids = [f"h{i}" for i in range(stack.hosts)]
    if name not in ids:
        raise SystemExit(f"no host {name!r} in this stack: its hosts are {', '.join(ids)}")
    return ids.index(name)


def cmd_kill_host(args) -> int:
    """Every process of the host SIGKILLed at once, as a power loss would; its namespace, address
    and link stay, as a replaced node would get the same address."""
    stack = Stack(Path(args.state_dir))
    if not stack.network:
        print("kill-host needs a stack of several hosts (up --hosts N)", file=sys.stderr)
        return 1
    host = host_index(stack, args.host)
    hosts.kill_host(stack.network.namespace(host))
    print(f"host {args.host} ({stack.address(host)}) lost: every process of it killed at {time.time():.3f}")
    return 0


def cmd_restore_host(args) -> int:
    stack = Stack(Path(args.state_dir))
    if not stack.network:
        print("restore-host needs a stack of several hosts (up --hosts N)", file=sys.stderr)
        return 1
    host = host_index(stack, args.host)
    if host == 0:
        print("the head host cannot rejoin a cluster that died with it: `down`, then `up`", file=sys.stderr)
        return 1
    if same_process(stack.state["services"][service_name(host)]) is not None:
        print(f"host {args.host} is running: nothing to restore", file=sys.stderr)
        return 1
    shutil.rmtree(stack.state["services"][service_name(host)].get("temp_dir", ""), ignore_errors=True)
    start_ray_node(stack, host)
    wait_for_nodes(stack, [host], 180)
    print(f"host {args.host} ({stack.address(host)}) back: its Ray node joined at {time.time():.3f}")
    return 0


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--state-dir", default=".stack", help="where the stack keeps its state, logs and env file")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "up", help="start the Ray nodes, the S3 endpoint and the MLflow server", formatter_class=HelpFormatter
    )
    up.add_argument(
        "--hosts", type=int, default=1, help="hosts, each its own network namespace and address (1: 127.0.0.1)"
    )
    up.add_argument("--ray-port", type=int, default=6379, help="Ray GCS port (RAY_ADDRESS)")
    up.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard and jobs API port")
    up.add_argument("--s3-port", type=int, default=9000, help="port of the S3 endpoint the stack starts")
    up.add_argument("--s3-endpoint", help="use this S3-compatible endpoint instead of starting one")
    up.add_argument("--bucket", default="ray-diffusion", help="bucket for data, runs, samples and MLflow artifacts")
    up.add_argument("--mlflow-port", type=int, default=5000, help="MLflow tracking server port")
    up.add_argument(
        "--backend-store-uri",
        help="MLflow backend store (default: MLFLOW_BACKEND_STORE_URI, which keeps a password off the command "
        "line, else sqlite in the state dir)",
    )
    up.add_argument("--num-cpus", type=int, help="CPUs each Ray node offers (default: all of the machine's)")
    up.add_argument("--num-gpus", type=int, help="GPUs each Ray node offers (default: all of the machine's)")
    sub.add_parser("down", help="stop and remove exactly what `up` made")
    sub.add_parser("status", help="the services and each host's Ray node (exit 0 when all run)")
    sub.add_parser("env", help="print the export lines for this stack")
    for name, what in (
        ("kill-host", "kill every process of a host (h1, ...)"),
        ("restore-host", "start a lost host's Ray node again"),
    ):
        sub.add_parser(name, help=what, formatter_class=HelpFormatter).add_argument("host", help="h1, h2, ...")
    args = p.parse_args(argv)
    if args.command == "up" and args.hosts < 1:
        p.error(f"--hosts must be at least 1, got {args.hosts}")
    commands = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "env": cmd_env}
    commands |= {"kill-host": cmd_kill_host, "restore-host": cmd_restore_host}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
