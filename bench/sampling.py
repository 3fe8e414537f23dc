"""Sampling throughput: the Serve endpoint at 1, 8 and 32 concurrent clients, batched
(@serve.batch groups callers into model batches) vs unbatched (one request per model call),
with latency percentiles; and the batch job's images/s. Side by side in one run, same model.

    python bench/sampling.py                                     # tiny UNet (random weights), CPU
    python bench/sampling.py --model cifar10 --steps 50 --gpus 1 --requests 256 --json bench/results/sampling-h100.json

Each client sends one-image /v1/samples requests (DDIM, --steps steps) back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from core import machine  # bench/core.py, beside this script

from diffusion.checkpoint import save_checkpoint
from diffusion.config import RECIPES, SamplerSettings
from diffusion.training import build_state


def write_checkpoint(model: str, path: Path) -> str:
    torch.manual_seed(0)
    state = build_state(RECIPES[model], torch.device("cpu"))
    save_checkpoint(path, state, RECIPES[model])
    return str(path)


def load(url: str, clients: int, requests: int, steps: int) -> dict:
    """`requests` one-image requests from `clients` threads; throughput and latency."""

    def one(i: int) -> float:
        body = json.dumps({"n": 1, "seed": i, "steps": steps, "format": "npz"}).encode()
        start = time.perf_counter()
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = np.array(list(pool.map(one, range(requests))))
    seconds = time.perf_counter() - start
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) * 1000
    return {"img_per_s": requests / seconds, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="UNet config (preset of the same name)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per image")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32], help="concurrent clients to compare")
    p.add_argument("--requests", type=int, default=64, help="requests per measurement")
    p.add_argument("--batch-size", type=int, default=16, help="model batch of the batched deployment")
    p.add_argument("--gpus", type=float, default=0, help="GPUs per replica and per batch-job worker")
    p.add_argument("--job-images", type=int, default=256, help="images for the batch-job measurement")
    p.add_argument("--port", type=int, default=8000, help="Serve's HTTP port on 127.0.0.1")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)

    from ray import serve

    from diffusion.platform.batch_sample import SamplingJob, sample_to
    from diffusion.platform.resources import Workers, connect
    from diffusion.platform.serve import ServeArgs, build_app

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        checkpoint = write_checkpoint(args.model, Path(tmp) / "checkpoint")
        connect()  # RAY_ADDRESS's cluster, or a local Ray, as the jobs do
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        for mode, batch_size in (("batched", args.batch_size), ("unbatched", 1)):
            app = build_app(ServeArgs(checkpoint=checkpoint, batch_size=batch_size, batch_wait_s=0.01, gpus=args.gpus))
            serve.run(app, name=mode, route_prefix=f"/{mode}", blocking=False)
            url = f"http://127.0.0.1:{args.port}/{mode}/v1/samples"
            load(url, 1, 2, args.steps)  # warm-up
            for clients in args.clients:
                row = {"mode": mode, "clients": clients, **load(url, clients, args.requests, args.steps)}
                rows.append(row)
                print(
                    f"{mode:9s} {clients:3d} clients: {row['img_per_s']:8.2f} img/s, latency p50 {row['p50_ms']:8.1f}"
                    f" p95 {row['p95_ms']:8.1f} p99 {row['p99_ms']:8.1f} ms",
                    flush=True,
                )
            serve.delete(mode)
        serve.shutdown()
        job = SamplingJob(
            checkpoint=checkpoint,
            seeds=tuple(range(args.job_images)),
            settings=SamplerSettings("ddim", args.steps),
            batch_size=args.batch_size,
            workers=Workers(gpus=args.gpus),
        )
        start = time.perf_counter()
        sample_to(job, f"{tmp}/samples", fmt="npz")
        job_rate = args.job_images / (time.perf_counter() - start)
        print(f"batch job: {job_rate:.2f} img/s ({args.job_images} images, batch {args.batch_size}, end to end)")
    for clients in args.clients:
        batched, unbatched = (
            next(r for r in rows if r["mode"] == m and r["clients"] == clients) for m in ("batched", "unbatched")
        )
        print(
            f"{clients:3d} clients: batched / unbatched throughput {batched['img_per_s'] / unbatched['img_per_s']:.2f}x"
        )
    if args.json:
        result = {
            "model": args.model,
            "steps": args.steps,
            "machine": machine("cuda" if args.gpus else "cpu"),
            "serve": rows,
            "batch_job_img_per_s": job_rate,
        }
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
