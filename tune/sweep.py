"""Sweep learning rate and noise schedule (and optionally beta_end, batch size, EMA decay, ...)
with Ray Tune and ASHA on the held-out L_simple; every trial is a Ray Train run, nested under
one MLflow parent run for side-by-side comparison.

    python tune/sweep.py --preset cifar10 --num-samples 16 --max-steps 20000 --data s3://bucket/cifar10
    python tune/sweep.py --preset tiny --num-samples 4 --max-steps 60 --lr-range 1e-4 3e-3 --schedules linear cosine
    python tune/sweep.py --preset tiny --space tune/space.yaml --name lr-sched --resume   # continue an interrupted one

The space: --lr-range (log-uniform), --schedules, --beta-ends, --batch-sizes, --ema-decays, or
--space FILE (YAML/JSON: {param: {loguniform|uniform: [low, high]} | {choice|grid: [values]} | value}).
Training options (after --preset and --config) are those of jobs/train.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusion.options import add_train_options, read_options_file, train_config
from diffusion.sweep import SEARCHABLE, SweepConfig, validate_space


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_argument_group("sweep")
    s.add_argument("--name", default="sweep", help="sweep name: Tune folder under --storage and MLflow parent run")
    s.add_argument("--num-samples", type=int, default=8, help="trials drawn from the space")
    s.add_argument(
        "--metric",
        default="heldout_loss",
        choices=["heldout_loss", "heldout_loss_ema", "fid"],
        help="what ASHA and the best trial minimise: held-out L_simple of the raw or EMA weights, or the FID of "
        "--fid-n EMA samples against --fid-splits (computed at every report: costly)",
    )
    s.add_argument("--grace-steps", type=int, default=0, help="steps before ASHA may stop a trial (0: max_steps/8)")
    s.add_argument("--reduction-factor", type=int, default=2, help="ASHA keeps the best 1/this at each rung")
    s.add_argument(
        "--max-concurrent", type=int, default=0, help="trials at once (0: as GPUs allow; 1 on clusters without GPUs)"
    )
    s.add_argument("--search-seed", type=int, default=0, help="seed of the random search")
    s.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this --name")
    s.add_argument(
        "--lr-range",
        type=float,
        nargs=2,
        default=[1e-5, 1e-3],
        metavar=("LOW", "HIGH"),
        help="learning rate, log-uniform",
    )
    s.add_argument("--schedules", nargs="+", default=["linear", "cosine"], help="beta schedules to choose from")
    s.add_argument("--beta-ends", type=float, nargs="+", default=None, help="linear beta_end values to choose from")
    s.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="global batch sizes to choose from")
    s.add_argument("--ema-decays", type=float, nargs="+", default=None, help="EMA decays to choose from")
    s.add_argument("--space", default=None, help="YAML/JSON search space (replaces the flags above)")
    add_train_options(p, skip=("name",))
    args = p.parse_args(argv)
    base = train_config(args, p)

    if args.space:
        space = read_options_file(Path(args.space), p, "--space", known=set(SEARCHABLE))
    else:
        space = {"lr": {"loguniform": args.lr_range}, "schedule": {"choice": args.schedules}}
        for key, values in (
            ("beta_end", args.beta_ends),
            ("batch_size", args.batch_sizes),
            ("ema_decay", args.ema_decays),
        ):
            if values:
                space[key] = {"choice": values}
    try:
        validate_space(space)
    except ValueError as e:
        p.error(str(e))
    if args.num_samples < 1 or args.reduction_factor < 2:
        p.error("--num-samples must be >= 1 and --reduction-factor >= 2")

    from diffusion.data import DataError, StorageError
    from diffusion.sweep import run_sweep

    config = SweepConfig(
        args.name,
        args.num_samples,
        args.metric,
        args.grace_steps,
        args.reduction_factor,
        args.max_concurrent,
        args.search_seed,
        args.resume,
    )
    try:
        best, checkpoint_uri = run_sweep(base, space, config)
    except (DataError, StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if best is None:
        return 130
    params = {k: best.config[k] for k in space}
    print(f"best trial {best.metrics['trial_id']}: {args.metric} {best.metrics[args.metric]:.4f} with {params}")
    print(f"best checkpoint: {checkpoint_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
