"""Generate N samples from a checkpoint across the cluster's GPUs (or CPU workers) with Ray
Data, write them to storage and log the run (and, with --figures, the papers' figures) to MLflow.

    python jobs/sample.py --checkpoint runs/cifar10-linear --n 50000 --sampler ddim --steps 100 --out samples/ddim100
    python jobs/sample.py --checkpoint runs:/<mlflow run id> --n 64 --figures --out s3://bucket/samples/demo
"""

from __future__ import annotations

from diffusion.platform.cli import add_sampler_options, add_sampling_job_options, parser, run, sampling_job


def main(argv=None) -> int:
    p = parser(__doc__)
    add_sampling_job_options(p, n=64, batch_size=64)
    add_sampler_options(p)
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--format", default="png", choices=["png", "npz"], help="one PNG per image, or npz shards")
    p.add_argument("--figures", action="store_true", help="also log the papers' figures to MLflow")
    p.add_argument("--figure-seeds", type=int, default=8, help="seeds per figure (an even number)")
    p.add_argument(
        "--data", default=None, help="prepared data set: two of its images for the DDPM interpolation figure"
    )
    args = p.parse_args(argv)
    job = sampling_job(args, p)
    if args.figure_seeds < 2 or args.figure_seeds % 2:
        p.error("--figure-seeds must be an even number >= 2 (interpolations take seeds in pairs)")

    from diffusion.platform.batch_sample import sample_to

    run_id = sample_to(job, args.out, args.format, args.figure_seeds if args.figures else 0, args.data)
    print(f"MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    run(main)
