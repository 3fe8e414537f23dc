"""FID and Inception Score of a checkpoint's samples against a prepared data set, on a Ray
cluster (sampling and Inception features on every GPU), logged to MLflow with every setting.

    python jobs/evaluate.py --checkpoint runs/cifar10-linear --data data/cifar10 --n 50000 --sampler ddim --steps 100 --spacing quadratic
    python jobs/evaluate.py --checkpoint runs:/<mlflow run id> --data s3://bucket/cifar10 --splits train --raw

The reference statistics are computed once per data set, splits and weights, and cached
beside the shards. Inception weights: --inception-weights, $FID_INCEPTION_WEIGHTS, or the
torch hub cache (pt_inception-2015-12-05-6726825d.pth, downloaded there when reachable).
"""

from __future__ import annotations

import argparse
import json
import sys

from diffusion.options import add_sampler_options, sampler_settings, sampler_speed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint, run folder, s3:// URI or runs:/<mlflow run id>")
    p.add_argument("--data", required=True, help="prepared data set of the reference statistics (folder or s3://)")
    p.add_argument("--splits", nargs="+", default=["train"], help="reference splits (the papers: train)")
    p.add_argument("--n", type=int, default=50000, help="samples (the papers: 50000)")
    add_sampler_options(p, steps=100, spacing="quadratic")
    p.add_argument("--raw", action="store_true", help="evaluate the raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--batch-size", type=int, default=100, help="images per model and Inception batch")
    p.add_argument("--workers", type=int, default=0, help="actors (0: one per GPU, or 1)")
    p.add_argument("--out", default=None, help="also keep the samples here as npz shards (folder or s3://)")
    p.add_argument("--inception-weights", default=None, help="FID Inception weights file")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    args = p.parse_args(argv)
    settings = sampler_settings(args, p)
    if args.n < 2 or args.batch_size < 1:
        p.error("--n must be >= 2 and --batch-size >= 1")

    from diffusion.data import DataError, StorageError
    from diffusion.evaluate import evaluate
    from diffusion.fid import inception_weights

    try:
        weights = inception_weights(args.inception_weights)
        results = evaluate(
            args.checkpoint,
            args.n,
            settings,
            args.data,
            args.splits,
            str(weights),
            not args.raw,
            args.seed,
            args.batch_size,
            args.workers,
            out=args.out,
            endpoint_url=args.endpoint_url,
            speed=sampler_speed(args),
        )
    except (DataError, StorageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2))
    print(
        f"FID {results['fid']:.2f}, IS {results['is_mean']:.2f} +- {results['is_std']:.2f} "
        f"({results['n']} samples vs {results['reference_n']} {results['reference_splits']} images)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
