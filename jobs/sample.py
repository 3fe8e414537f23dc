"""Generate N samples from a checkpoint across the cluster's GPUs (or CPU workers) with Ray
Data, write them to storage and log the run (and, with --figures, the papers' figures) to MLflow.

    python jobs/sample.py --checkpoint runs/cifar10-linear --n 50000 --sampler ddim --steps 100 --out samples/ddim100
    python jobs/sample.py --checkpoint runs:/<mlflow run id> --n 64 --figures --out s3://bucket/samples/demo
"""

from __future__ import annotations

import argparse
import sys

from diffusion.options import add_sampler_options, sampler_settings, sampler_speed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint, run folder, s3:// URI or runs:/<mlflow run id>")
    p.add_argument("--n", type=int, default=64, help="number of images (seeds seed .. seed+n-1)")
    add_sampler_options(p)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--format", default="png", choices=["png", "npz"], help="one PNG per image, or npz shards")
    p.add_argument("--batch-size", type=int, default=64, help="images per model batch")
    p.add_argument("--workers", type=int, default=0, help="sampling actors (0: one per GPU, or 1)")
    p.add_argument("--figures", action="store_true", help="also log the papers' figures to MLflow")
    p.add_argument("--figure-seeds", type=int, default=8, help="seeds per figure (an even number)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    args = p.parse_args(argv)
    settings = sampler_settings(args, p)
    if args.n < 1 or args.batch_size < 1:
        p.error("--n and --batch-size must be >= 1")
    if args.figure_seeds < 2 or args.figure_seeds % 2:
        p.error("--figure-seeds must be an even number >= 2 (interpolations take seeds in pairs)")

    from diffusion.batch_sample import run
    from diffusion.data import StorageError

    try:
        run_id = run(
            args.checkpoint,
            args.n,
            settings,
            args.out,
            args.seed,
            args.format,
            args.batch_size,
            args.workers,
            endpoint_url=args.endpoint_url,
            with_figures=args.figures,
            figure_seeds=args.figure_seeds,
            speed=sampler_speed(args),
        )
    except (StorageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
