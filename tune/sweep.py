"""Sweep learning rate and noise schedule (and optionally beta_end, batch size, EMA decay, ...)
with Ray Tune and ASHA on the held-out L_simple; every trial is a Ray Train run, nested under
one MLflow parent run for side-by-side comparison.

    python tune/sweep.py --preset cifar10 --num-samples 16 --max-steps 20000 --data s3://bucket/cifar10
    python tune/sweep.py --preset tiny --num-samples 4 --max-steps 60 --search-lr 1e-4 3e-3 --search-schedule linear cosine
    python tune/sweep.py --preset tiny --space tune/space.yaml --name lr-sched --resume   # continue an interrupted one

The space: a --search-<option> flag per searchable option (--search-lr LOW HIGH, log-uniform;
--search-schedule, --search-beta-end, --search-batch-size, ... VALUES to choose among), or
--space FILE (YAML/JSON: {param: {loguniform|uniform: [low, high]} | {choice|grid: [values]} | value}).
Training options (after --preset and --config) are those of jobs/train.py.
"""

from __future__ import annotations

from diffusion.platform.cli import (
    add_options,
    add_search_options,
    add_train_options,
    given,
    parser,
    run,
    search_space,
    train_job,
)
from diffusion.platform.settings import SweepConfig, validate_space


def main(argv=None) -> int:
    p = parser(__doc__)
    add_options(p.add_argument_group("sweep"), SweepConfig, given_only=True)
    add_search_options(p)
    add_train_options(p, skip=("name",), argv=argv)
    args = p.parse_args(argv)
    base = train_job(args, p)
    space = validate_space(search_space(args, p))
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
