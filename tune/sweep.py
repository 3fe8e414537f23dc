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

from pathlib import Path

from diffusion.platform.cli import add_options, add_train_options, given, parser, read_options_file, run, train_job
from diffusion.platform.settings import SEARCHABLE, SweepConfig, validate_space


def main(argv=None) -> int:
    p = parser(__doc__)
    add_options(p.add_argument_group("sweep"), SweepConfig, given_only=True)
    s = p.add_argument_group("search space")
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
    add_train_options(p, skip=("name",), argv=argv)
    args = p.parse_args(argv)
    base = train_job(args, p)

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
    validate_space(space)
    sweep = SweepConfig(**given(args, SweepConfig))

    from diffusion.platform.sweep import run_sweep

    best, checkpoint_uri = run_sweep(base, space, sweep)
    if best is None:
        return 130
    params = {k: best.config[k] for k in space}
    print(f"best trial {best.metrics['trial_id']}: {sweep.metric} {best.metrics[sweep.metric]:.4f} with {params}")
    print(f"best checkpoint: {checkpoint_uri}")
    return 0


if __name__ == "__main__":
    run(main)
