"""What the command lines (jobs/, tune/) share: a parser that shows every default, TrainConfig's
options (a preset, then an optional YAML/JSON file, then one flag per field, each overriding
the last), the sampler's options, and one-line errors.

Only the standard library and `diffusion.config` are imported here, so every --help answers
before torch, Ray or MLflow is imported.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from ..config import (
    PRECISIONS,
    PRESETS,
    SAMPLERS,
    SPACINGS,
    VARIANCES,
    WHICH,
    SamplerSettings,
    SamplerSpeed,
    TrainConfig,
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default after its help (but for
    required options, which have none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required:
            return f"{action.help} (required)"
        if "(default:" in (action.help or ""):  # the help says it in words
            return action.help
        return super()._get_help_string(action)


def parser(doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def fail(message: str, code: int = 1) -> int:
    """Print `error: message` on stderr (one line, no traceback) and return the exit code."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # SIGTERM: unwind like Ctrl-C, so that cleanups (Ray's atexit) run


def run(main: Callable[[], int]) -> None:
    """Run a command line's `main` and exit with its code (`exit_code`); SIGTERM exits 143."""
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(exit_code(main))


def exit_code(main: Callable[[], int]) -> int:
    """`main`'s exit code: bad input (an InputError) is one line on stderr and exit code 1,
    Ctrl-C exit code 130; anything else is a bug and keeps its traceback."""
    from ..errors import InputError

    try:
        return main()
    except InputError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def add_dataclass_options(parser: argparse._ActionsContainer, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass `cls`, with the field's metadata help and default. A flag
    not given leaves no attribute (argparse.SUPPRESS), so that only the flags given override
    what comes before them (a preset, a file)."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} (default: {f.default!r})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(flag, type=type(f.default), choices=choices, default=argparse.SUPPRESS, help=help)


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of dataclass `cls` that were given as flags."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def add_train_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """--preset, --config FILE and a flag per TrainConfig field (but those in `skip`); the
    bracketed defaults are the cifar10 preset's."""
    parser.add_argument("--preset", default="cifar10", choices=sorted(PRESETS), help="recipe to start from")
    parser.add_argument("--config", default=None, help="YAML or JSON file of options (between preset and flags)")
    group = parser.add_argument_group(
        "training options", "The defaults shown are the cifar10 preset's; --preset and --config change them."
    )
    add_dataclass_options(group, TrainConfig, skip)


def train_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainConfig:
    """The validated TrainConfig the options describe (a parser error names a bad option)."""
    config = PRESETS[args.preset]
    if args.config:
        config = config.replace(**read_options_file(Path(args.config), parser, "--config"))
    try:
        return config.replace(**given(args, TrainConfig)).validate()
    except ValueError as e:
        parser.error(str(e))


def read_options_file(path: Path, parser: argparse.ArgumentParser, flag: str, known: set[str] | None = None) -> dict:
    """A YAML or JSON mapping whose keys are all `known` (TrainConfig fields by default)."""
    if not path.is_file():
        parser.error(f"{flag} {path} does not exist")
    text, is_yaml = path.read_text(), path.suffix in (".yaml", ".yml")
    try:
        if is_yaml:
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:  # noqa: BLE001 - json.JSONDecodeError or yaml.YAMLError: a malformed file
        parser.error(f"{flag} {path} is not valid {'YAML' if is_yaml else 'JSON'}: {e}")
    if not isinstance(values, dict):
        parser.error(f"{flag} {path}: expected a mapping of option names to values")
    allowed = known if known is not None else {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        hint = f"; choose from {sorted(known)}" if known is not None else " (see --help)"
        parser.error(f"{flag} {path}: unknown option(s) {unknown}{hint}")
    return values


def add_sampler_options(parser: argparse.ArgumentParser, steps: int = 50, spacing: str = "uniform") -> None:
    """--sampler, --steps, --eta, --spacing, --variance (a SamplerSettings), --precision, --compile."""
    g = parser.add_argument_group("sampler")
    g.add_argument("--sampler", default="ddim", choices=SAMPLERS, help="DDIM (steps, eta) or DDPM (all T steps)")
    g.add_argument("--steps", type=int, default=steps, help="DDIM steps: the length of the sub-sequence tau")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    g.add_argument("--spacing", default=spacing, choices=SPACINGS, help="DDIM tau spacing")
    g.add_argument(
        "--variance",
        default=None,
        choices=VARIANCES,
        help="sigma^2: posterior (DDPM beta-tilde, DDIM sigma(eta)) or beta (DDPM beta_t, DDIM sigma-hat with "
        "--eta 1); default: the checkpoint's for DDPM (posterior unless imported weights say otherwise), posterior for DDIM",
    )
    g.add_argument(
        "--clip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clip the predicted x_0 to [-1, 1]; default: the checkpoint's for DDPM, off for DDIM",
    )
    add_speed_options(g)


def add_speed_options(parser: argparse._ActionsContainer) -> None:
    """--precision, --compile: a SamplerSpeed."""
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="UNet precision (auto: bf16 on GPUs)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA graphs on GPUs)")


def sampler_speed(args: argparse.Namespace) -> SamplerSpeed:
    return SamplerSpeed(args.precision, args.compile)


def add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    """--checkpoint (anything a checkpoint can be), --which, --raw, --endpoint-url."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run folder, a checkpoint (folder or .pt), s3://..., runs:/<run id>[/<artifact path>], "
        "models:/<name>/<version or @alias>, a diffusers folder or DDPM reference weights",
    )
    parser.add_argument(
        "--which", default="latest", choices=WHICH, help="of a run folder's checkpoints: the latest, or the best"
    )
    parser.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")


def add_sampling_job_options(parser: argparse.ArgumentParser, n: int, batch_size: int) -> None:
    """What a Ray sampling job (jobs/sample.py, jobs/evaluate.py) samples, and on how many actors."""
    add_checkpoint_options(parser)
    parser.add_argument("--n", type=int, default=n, help="number of images (seeds seed .. seed + n - 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per model batch")
    parser.add_argument("--workers", type=int, default=0, help="actors (0: one per GPU, or 1)")


def sampling_job(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The SamplingJob the options describe (a parser error names a bad option)."""
    settings = sampler_settings(args, parser)
    if args.n < 1 or args.batch_size < 1:
        parser.error("--n and --batch-size must be >= 1")
    from .batch_sample import SamplingJob
    from .resources import Workers

    return SamplingJob(
        checkpoint=args.checkpoint,
        which=args.which,
        n=args.n,
        seed=args.seed,
        settings=settings,
        speed=sampler_speed(args),
        ema=not args.raw,
        batch_size=args.batch_size,
        workers=Workers(count=args.workers),
        endpoint_url=args.endpoint_url,
    )


def sampler_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SamplerSettings:
    """The settings, checked as far as they can be before the model's T is known."""
    if args.steps < 1 or not args.eta >= 0:
        parser.error(f"--steps must be >= 1 and --eta >= 0, got {args.steps} and {args.eta}")
    return SamplerSettings(args.sampler, args.steps, args.eta, args.spacing, args.variance, args.clip)
