"""Training throughput through Ray Train: images/s in total and per worker at 1 and 2 (or
more) workers, on the same data, side by side; the steady-state rate is the last logged window.

    python bench/scaling.py                                       # tiny UNet on CPU workers, synthetic 32x32 data
    python bench/scaling.py --model cifar10 --workers 1 --batch-size 128 --steps 200 --gpus-per-worker 1

For the UNet alone, without Ray, see bench/core.py (same train_step).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from core import machine  # bench/core.py, beside this script
from data import synthetic_source  # bench/data.py, beside this script

from diffusion.platform.ray_train import train_on_ray
from diffusion.platform.settings import PRESETS
from diffusion.platform.shards import write_shards
from diffusion.platform.storage import open_location


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="UNet config (preset of the same name)")
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="worker counts to compare")
    p.add_argument("--batch-size", type=int, default=16, help="per-worker batch size (global = this x workers)")
    p.add_argument("--steps", type=int, default=40, help="training steps per measurement")
    p.add_argument("--gpus-per-worker", type=float, default=-1, help="GPUs per worker (-1: auto)")
    p.add_argument("--images", type=int, default=4096, help="synthetic images in the data set")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        data = f"{tmp}/data"
        write_shards(synthetic_source(args.images), open_location(data), quiet=True)
        for workers in args.workers:
            config = PRESETS[args.model].replace(
                data=data,
                storage=f"{tmp}/runs",
                name=f"bench-{workers}",
                num_workers=workers,
                batch_size=args.batch_size * workers,
                max_steps=args.steps,
                log_every=args.steps // 2,
                eval_every=10**9,
                sample_every=10**9,
                checkpoint_every=10**9,
                heldout_size=16,
                gpus_per_worker=args.gpus_per_worker,
            )
            result = train_on_ray(config)
            rate = result.metrics["images_per_s"]
            rows.append(
                {
                    "workers": workers,
                    "global_batch": config.recipe.batch_size,
                    "img_per_s": rate,
                    "img_per_s_per_worker": rate / workers,
                }
            )
            print(
                f"{workers} worker(s), global batch {config.recipe.batch_size}: {rate:8.1f} img/s, "
                f"{rate / workers:8.1f} per worker",
                flush=True,
            )
    base = rows[0]["img_per_s"]
    for row in rows:
        row["speedup"] = row["img_per_s"] / base
    print(
        "speed-up over",
        rows[0]["workers"],
        "worker(s):",
        ", ".join(f"{r['workers']}: {r['speedup']:.2f}x" for r in rows),
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "machine": machine(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
