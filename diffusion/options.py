"""Command-line options shared by the entry points: TrainConfig's (jobs/train.py, tune/sweep.py:
a preset, then an optional YAML/JSON file, then one flag per field, each overriding the last)
and the sampler's (jobs/sample.py, jobs/evaluate.py)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from .generate import SamplerSettings
from .speed import PRECISIONS, SamplerSpeed
from .training import PRESETS, TrainConfig


def add_train_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """--preset, --config FILE and a flag per TrainConfig field (but those in `skip`)."""
    parser.add_argument("--preset", default="cifar10", choices=sorted(PRESETS), help="recipe to start from")
    parser.add_argument("--config", default=None, help="YAML or JSON file of options (between preset and flags)")
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=None, help=f.metadata["help"])


def train_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainConfig:
    """The validated TrainConfig the options describe (a parser error names a bad option)."""
    config = PRESETS[args.preset]
    if args.config:
        config = config.replace(**read_options_file(Path(args.config), parser, "--config"))
    overrides = {f.name: getattr(args, f.name, None) for f in fields(TrainConfig)}
    try:
        return config.replace(**{k: v for k, v in overrides.items() if v is not None}).validate()
    except ValueError as e:
        parser.error(str(e))


def read_options_file(path: Path, parser: argparse.ArgumentParser, flag: str, known: set[str] | None = None) -> dict:
    """A YAML or JSON mapping whose keys are all `known` (TrainConfig fields by default)."""
    if not path.is_file():
        parser.error(f"{flag} {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        parser.error(f"{flag} {path}: expected a mapping of option names to values")
    allowed = known if known is not None else {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        hint = f"; choose from {sorted(known)}" if known is not None else " (see --help)"
        parser.error(f"{flag} {path}: unknown option(s) {unknown}{hint}")
    return values


def add_sampler_options(parser: argparse.ArgumentParser, steps: int = 50, spacing: str = "uniform") -> None:
    """--sampler, --steps, --eta, --spacing, --variance: a SamplerSettings."""
    parser.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="DDIM (steps, eta) or DDPM (all T)")
    parser.add_argument("--steps", type=int, default=steps, help="DDIM steps")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument("--spacing", default=spacing, choices=["uniform", "quadratic"], help="DDIM tau spacing")
    parser.add_argument("--variance", default="posterior", choices=["posterior", "beta"], help="DDPM sigma^2")
    add_speed_options(parser)


def add_speed_options(parser: argparse.ArgumentParser) -> None:
    """--precision, --compile: a SamplerSpeed."""
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="UNet precision (auto: bf16 on GPUs)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA graphs on GPUs)")


def sampler_speed(args: argparse.Namespace) -> SamplerSpeed:
    return SamplerSpeed(args.precision, args.compile)


def sampler_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SamplerSettings:
    if not 1 <= args.steps <= 1000 or args.eta < 0:
        parser.error(f"--steps must be in [1, 1000] and --eta >= 0, got {args.steps} and {args.eta}")
    return SamplerSettings(args.sampler, args.steps, args.eta, args.spacing, args.variance)
