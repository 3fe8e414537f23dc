"""Train the DDPM UNet with Ray Train (DDP over the cluster's GPUs, or CPU workers), fed by
Ray Data from a prepared data set, checkpointing to the run's storage and tracking in MLflow.

    python jobs/train.py --preset cifar10 --data data/cifar10                        # a laptop: starts a local Ray
    ray job submit --working-dir . -- python jobs/train.py --preset cifar10 --data s3://bucket/cifar10 --storage s3://bucket/runs
    python jobs/train.py --preset tiny --data data/cifar10-jpeg --max-steps 200      # a CPU demo

Every option below overrides the preset; --config FILE (YAML or JSON) sits between the two.
Re-running with the same --name (and --storage) resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from diffusion.training import PRESETS, TrainConfig


def _flag_type(default):
    return type(default) if not isinstance(default, bool) else None


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar10", choices=sorted(PRESETS), help="recipe to start from")
    p.add_argument("--config", default=None, help="YAML or JSON file of options (between preset and flags)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=_flag_type(f.default), default=None, help=f.metadata["help"])
    args = p.parse_args(argv)
    config = PRESETS[args.preset]
    if args.config:
        config = config.replace(**_read_file(Path(args.config), p))
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    try:
        return config.replace(**overrides).validate()
    except ValueError as e:
        p.error(str(e))


def _read_file(path: Path, parser: argparse.ArgumentParser) -> dict:
    if not path.is_file():
        parser.error(f"--config {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"--config {path}: unknown option(s) {unknown}")
    return values


def main(argv=None) -> int:
    config = parse_args(argv)
    from diffusion.data import DataError, StorageError
    from diffusion.ray_train import fit

    try:
        result = fit(config)
    except (DataError, StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    print(f"latest checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
