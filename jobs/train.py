"""Train the DDPM UNet with Ray Train (DDP over the cluster's GPUs, or CPU workers), fed by
Ray Data from a prepared data set, checkpointing to the run's storage and tracking in MLflow.

    python jobs/train.py --preset cifar10 --data data/cifar10                        # a laptop: starts a local Ray
    ray job submit --working-dir . -- python jobs/train.py --preset cifar10 --data s3://bucket/cifar10 --storage s3://bucket/runs
    python jobs/train.py --preset tiny --data data/cifar10 --max-steps 200           # a CPU demo

Every option below overrides the preset; --config FILE (YAML or JSON) sits between the two.
Re-running with the same --name (and --storage) resumes from the latest checkpoint. It ends by
printing where to see its MLflow run and its latest checkpoint.
"""

from __future__ import annotations

import posixpath

from diffusion.platform.cli import add_train_options, fail, parser, run, train_job
from diffusion.platform.settings import TrainJob


def parse_args(argv=None) -> TrainJob:
    p = parser(__doc__)
    add_train_options(p, argv=argv)
    return train_job(p.parse_args(argv), p)


def main(argv=None) -> int:
    job = parse_args(argv)
    from diffusion.platform.ray_train import train_on_ray

    result = train_on_ray(job)
    if result.error:
        return fail(f"training failed: {result.error}")
    if result.checkpoint:  # as a URI the other jobs take (Ray's path drops the s3:// scheme)
        run_and_checkpoint = result.checkpoint.path.rstrip("/").split("/")[-2:]
        print(f"latest checkpoint: {posixpath.join(job.settings.storage, *run_and_checkpoint)}")
    return 0


if __name__ == "__main__":
    run(main)
