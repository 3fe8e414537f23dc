"""A bounded load test of the Serve replica: concurrent clients mixing cheap DDIM requests, long
DDPM requests, health checks and hostile requests (NaN, booleans as numbers, a 5 MB body, a PNG
that declares 12000x12000 pixels, a 10,000-level nested body) for a fixed time, at whose end the
requests still running are cancelled (their connections closed: the replica stops a cancelled
DDPM chain) and counted as such. It prints its progress every 10 s (--progress-every) and reports, per kind, how
many requests got the answer they should (200; 200 or 503 for DDPM, whose lane is bounded; 4xx
for the hostile ones: never a 500), how many the end cancelled, the latency p50/p95 of those
answered, and the replica's memory (RSS) over the run.

    python bench/load.py                                  # tiny model, T = 1000, 8 clients, 60 s, CPU
    python bench/load.py --clients 32 --seconds 300 --model cifar10 --gpus 1 --json bench/results/load-h100.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from core import describe, machine  # bench/core.py, beside this script

KINDS = {"ddim": 6, "ddpm": 1, "health": 2, "hostile": 3}  # relative frequencies
CANCELLED = 0  # the status of a request still running when the time was up


def hostile_bodies() -> list[bytes]:
    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")
    png = base64.b64encode(bomb.getvalue()).decode()
    return [
        b'{"eta": NaN}',
        b'{"n": true}',
        b'{"n": "3"}',
        b'{"seeds": [1e400]}',
        b'{"pad": "' + b"x" * (5 << 20) + b'"}',
        b"[" * 10_000 + b"]" * 10_000,
        json.dumps({"mode": "ddpm", "images": [png, png], "t": 5}).encode(),
    ]


def request(url: str, kind: str, hostile: list[bytes], rng: random.Random, timeout: float) -> int:
    """The request's HTTP status, or CANCELLED when no answer came within `timeout` s (the time
    left): its connection is closed, which cancels it at the replica."""
    try:
        return send(url, kind, hostile, rng, timeout)
    except TimeoutError:
        return CANCELLED
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            return CANCELLED
        raise


def send(url: str, kind: str, hostile: list[bytes], rng: random.Random, timeout: float) -> int:
    if kind == "health":
        with urllib.request.urlopen(f"{url}/healthz", timeout=timeout) as r:
            return r.status
    if kind == "ddim":
        body = json.dumps({"n": rng.randint(1, 4), "steps": 10, "seed": rng.randrange(1 << 30), "format": "npz"})
        path, data = "/v1/samples", body.encode()
    elif kind == "ddpm":
        path, data = "/v1/samples", json.dumps({"sampler": "ddpm", "n": 1, "format": "npz"}).encode()
    else:
        data = rng.choice(hostile)
        path = "/v1/interpolations" if b'"mode"' in data else "/v1/samples"
    req = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def expected(kind: str, status: int) -> bool:
    if kind in ("ddim", "health"):
        return status == 200
    if kind == "ddpm":
        return status in (200, 503)
    return 400 <= status < 500


def replica_rss() -> int:
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if "ServeReplica:" in " ".join(p.info["cmdline"] or [])]
    return sum(p.memory_info().rss for p in procs)


def run(url: str, clients: int, seconds: float, seed: int, progress_every: float) -> tuple[dict, list[int]]:
    hostile = hostile_bodies()
    records: dict[str, list[tuple[int, float]]] = defaultdict(list)
    lock, stop = threading.Lock(), time.time() + seconds
    rss = [replica_rss()]

    def client(i: int) -> None:
        rng = random.Random(seed + i)
        while (left := stop - time.time()) > 0:
            kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            start = time.perf_counter()
            status = request(url, kind, hostile, rng, timeout=left)
            with lock:
                records[kind].append((status, time.perf_counter() - start))

    started, last_progress = time.time(), time.time()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        while any(not f.done() for f in futures):
            time.sleep(1)
            rss.append(replica_rss())
            if time.time() - last_progress >= progress_every:
                last_progress = time.time()
                with lock:
                    done = {kind: len(got) for kind, got in records.items()}
                counts = ", ".join(f"{kind} {done.get(kind, 0)}" for kind in KINDS)
                print(
                    f"{last_progress - started:.0f}/{seconds:.0f} s: {sum(done.values())} answered ({counts})",
                    flush=True,
                )
        for f in futures:
            f.result()
    return records, rss


def summary(records: dict, rss: list[int], seconds: float) -> dict:
    rows = {}
    for kind in KINDS:
        got = [(s, t) for s, t in records.get(kind, []) if s != CANCELLED]
        latencies = np.array([t for _, t in got]) * 1000 if got else np.zeros(1)
        statuses = defaultdict(int)
        for status, _ in got:
            statuses[status] += 1
        rows[kind] = {
            "requests": len(got),  # answered
            "as_expected": sum(expected(kind, s) for s, _ in got) / max(1, len(got)),
            "statuses": dict(sorted(statuses.items())),
            "cancelled_at_the_end": len(records.get(kind, [])) - len(got),
            "p50_ms": float(np.percentile(latencies, 50)),
            "p95_ms": float(np.percentile(latencies, 95)),
        }
    return {
        "seconds": seconds,
        "kinds": rows,
        "replica_rss_mib": {"start": rss[0] / 2**20, "max": max(rss) / 2**20, "end": rss[-1] / 2**20},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="UNet config (preset of the same name), untrained weights")
    p.add_argument("--num-timesteps", type=int, default=1000, help="T of the served model")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--seconds", type=float, default=60, help="how long the clients send requests")
    p.add_argument("--batch-size", type=int, default=16, help="the replica's model batch")
    p.add_argument("--gpus", type=float, default=0, help="GPUs for the replica")
    p.add_argument("--seed", type=int, default=0, help="seed of the clients' choices")
    p.add_argument("--progress-every", type=float, default=10, help="seconds between progress lines")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    import torch
    from ray import serve

    from diffusion.checkpoint import save_checkpoint
    from diffusion.config import RECIPES
    from diffusion.platform.net import free_port, wait_for_http
    from diffusion.platform.resources import connect
    from diffusion.platform.serve import build_app
    from diffusion.platform.settings import ServeArgs
    from diffusion.training import build_state

    with tempfile.TemporaryDirectory() as tmp:
        config = RECIPES[args.model].replace(num_timesteps=args.num_timesteps)
        save_checkpoint(Path(tmp) / "checkpoint", build_state(config, torch.device("cpu")), config)
        connect()  # RAY_ADDRESS's cluster, or a local Ray, as the jobs do
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve_args = ServeArgs(checkpoint=str(Path(tmp) / "checkpoint"), batch_size=args.batch_size, gpus=args.gpus)
        serve.run(build_app(serve_args), blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", 120, any_status=False)
        records, rss = run(url, args.clients, args.seconds, args.seed, args.progress_every)
        serve.shutdown()
    result = {
        "model": args.model,
        "num_timesteps": args.num_timesteps,
        "clients": args.clients,
        "machine": machine("cuda" if args.gpus else "cpu"),
        **summary(records, rss, args.seconds),
    }
    print(
        f"{args.clients} clients for {args.seconds:.0f} s, {args.model} T={args.num_timesteps} on {describe(result['machine'])}"
    )
    print("| kind | answered | as expected | statuses | cancelled at the end | p50 ms | p95 ms |")
    print("|---|---|---|---|---|---|---|")
    for kind, row in result["kinds"].items():
        statuses = ", ".join(f"{s}: {n}" for s, n in row["statuses"].items())
        print(
            f"| {kind} | {row['requests']} | {row['as_expected']:.0%} | {statuses} | {row['cancelled_at_the_end']} "
            f"| {row['p50_ms']:.0f} | {row['p95_ms']:.0f} |"
        )
    memory = result["replica_rss_mib"]
    print(
        f"replica RSS: {memory['start']:.0f} MiB at the start, {memory['max']:.0f} MiB at most, {memory['end']:.0f} at the end"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
