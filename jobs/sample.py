"""Generate samples from a checkpoint across the cluster's GPUs (or CPU workers) with Ray Data,
write them to storage and log the run (and, with --figures, the papers' figures) to MLflow.

    python jobs/sample.py --checkpoint runs/cifar10-linear --seeds 0-49999 --sampler ddim --steps 100 --out samples/ddim100
    python jobs/sample.py --checkpoint runs:/<mlflow run id> --seeds 0-63 --figures --out s3://bucket/samples/demo

The flags mean what they mean to jobs/generate.py (the same in one process, without Ray or
MLflow); --out may also be s3://bucket/prefix, and --format npz writes npz shards instead of
one PNG per seed.
"""

from __future__ import annotations

from diffusion.platform.cli import add_sampling_options, parser, run, sampling_job


def main(argv=None) -> int:
    p = parser(__doc__)
    add_sampling_options(p, n=64, batch_size=64, workers=True)
    p.add_argument("--format", default="png", choices=["png", "npz"], help="one PNG per seed, or npz shards")
    args = p.parse_args(argv)
    job = sampling_job(args, p)

    from diffusion.platform.batch_sample import sample_to

    figure_seeds = args.figure_seeds if args.figures or args.full_figures else 0
    run_id = sample_to(job, args.out, args.format, figure_seeds, args.full_figures, args.data)
    print(f"MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    run(main)
