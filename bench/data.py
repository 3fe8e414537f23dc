"""Shard streaming throughput (images/s) into torch training batches, from a local folder
and from an S3 endpoint, through Ray Data and through the plain iterator, side by side.

    python bench/data.py                                   # the shared CIFAR-10 JPEGs if present, else synthetic
    python bench/data.py --synthetic 20000 --batch-size 128 --json bench/results/data.json

S3 is a moto server started on 127.0.0.1 by the benchmark (or --s3-endpoint for a real store,
with credentials in the environment). Each measurement reads every image once and applies
the training transform (uint8 -> [-1, 1], random flip); compare the numbers with the GPU's
training rate (bench/core.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from core import machine  # bench/core.py, beside this script

from diffusion.images import to_model_input
from diffusion.platform.resources import connect
from diffusion.platform.shards import ShardSet, write_shards
from diffusion.platform.sources import Source, imagefolder_source
from diffusion.platform.storage import open_location

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def synthetic_source(n: int) -> Source:
    rng = np.random.default_rng(0)

    def chunks():
        for start in range(0, n, 1000):
            count = min(1000, n - start)
            yield "train", rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, count)

    return Source("synthetic", ["train"], [str(i) for i in range(10)], chunks(), {"n": n})


def start_moto() -> str:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_EC2_METADATA_DISABLED="true")
    return f"http://127.0.0.1:{port}"


def plain(shards: ShardSet, batch_size: int) -> int:
    n = 0
    for batch in shards.iter_batches(batch_size, shuffle=True):
        n += len(to_model_input(torch.from_numpy(batch["image"])))
    return n


def with_ray(shards: ShardSet, batch_size: int) -> int:
    n = 0
    ds = shards.ray_dataset(columns=["image", "label"])
    for batch in ds.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.uint8, "label": torch.int64}):
        n += len(to_model_input(batch["image"]))
    return n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--source", default=str(SHARED_CIFAR), help="image folder or tar (default: the shared CIFAR-10 JPEGs)"
    )
    p.add_argument("--synthetic", type=int, default=0, help="use N random 32x32 images instead of --source")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--s3-endpoint", default=None, help="a running S3 store (default: start moto on 127.0.0.1)")
    p.add_argument("--bucket", default="bench", help="bucket to write to (created on the moto server)")
    p.add_argument("--repeats", type=int, default=2, help="passes per measurement; the fastest counts (warm-up)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)

    import boto3

    endpoint = args.s3_endpoint or start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    if not args.s3_endpoint:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=args.bucket)
    use_synthetic = args.synthetic or not Path(args.source).exists()

    def source():
        return (
            synthetic_source(args.synthetic or 20000)
            if use_synthetic
            else imagefolder_source(Path(args.source), None, None)
        )

    with tempfile.TemporaryDirectory() as tmp:
        uris = {"local": f"{tmp}/shards", "s3": f"s3://{args.bucket}/bench-shards"}
        for uri in uris.values():
            write_shards(source(), open_location(uri), quiet=True)
        connect()  # RAY_ADDRESS's cluster, or a local Ray, as the jobs do
        rows = []
        for storage, uri in uris.items():
            shards = ShardSet.open(uri, verify="size")
            for reader, fn in [("plain", plain), ("ray_data", with_ray)]:
                seconds = float("inf")
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    n = fn(shards, args.batch_size)
                    seconds = min(seconds, time.perf_counter() - start)
                rows.append(
                    {"storage": storage, "reader": reader, "images": n, "seconds": seconds, "img_per_s": n / seconds}
                )
                print(
                    f"{storage:5s} {reader:8s}: {n} images in {seconds:6.2f} s = {n / seconds:9.0f} img/s", flush=True
                )
    base = rows[0]["img_per_s"]
    for row in rows:
        row["ratio_to_local_plain"] = row["img_per_s"] / base
    print(
        "ratios to local/plain:",
        ", ".join(f"{r['storage']}/{r['reader']} {r['ratio_to_local_plain']:.2f}" for r in rows),
    )
    if args.json:
        meta = {
            "machine": machine(),
            "source": "synthetic" if use_synthetic else args.source,
            "batch_size": args.batch_size,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
