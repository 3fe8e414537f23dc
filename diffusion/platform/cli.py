"""What the command lines (jobs/, tune/) share: a parser that shows every default, a flag per
field of the option dataclasses (`add_options`: the training job's, a preset, then an optional
YAML/JSON file, then the flags, each overriding the last; the sampler's; Serve's), and one-line
errors.

Only the standard library, `diffusion.config` and `diffusion.platform.settings` are imported
here, so every --help answers before torch, Ray or MLflow is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from ..config import Recipe, SamplerSettings, Speed, range_text
from .settings import (
    DEFAULT_SPACE,
    PRESETS,
    RECIPE_FIELDS,
    RUN_FIELDS,
    SEARCHABLE,
    CheckpointOptions,
    RunSettings,
    Tracking,
    TrainJob,
    job_from,
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and an option's default after its help, once: not where
    the help already says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required:
            return f"{action.help} (required)"
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse in the commands' one error style: a usage error (an unknown flag, a missing or
    malformed value) is one line naming it, `error: <problem> (see <prog> --help)`, exit code 2,
    as `exit_code` answers an option out of range or in conflict."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser(doc: str | None) -> Parser:
    return Parser(description=doc, formatter_class=HelpFormatter)


def fail(message: str, code: int = 1) -> int:
    """Print `error: message` on stderr (one line, no traceback) and return the exit code."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # SIGTERM: unwind like Ctrl-C, so that cleanups (Ray's atexit) run


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class PlainText:
    """A text stream writing to `stream` without ANSI escape sequences."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(ANSI_ESCAPE.sub("", text))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def plain_off_terminal() -> None:
    """Strip colour codes from stdout and stderr where they are not a terminal (a log file, a
    `ray job submit` log, CI). The driver prints every Ray process's lines, and Ray colours
    their `(RayTrainWorker pid=...)` prefixes, its dashboard's URL and `[repeated Nx across
    cluster]` whatever the stream; only the first of these has a switch (RAY_COLOR_PREFIX).
    Off a terminal, MLflow's bar for a download (a line for each file of a logged model) is off."""
    for name in ("stdout", "stderr"):
        if not getattr(sys, name).isatty():
            setattr(sys, name, PlainText(getattr(sys, name)))
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def run(main: Callable[[], int]) -> None:
    """Run a command line's `main` and exit with its code (`exit_code`), its output without
    colour codes off a terminal; SIGTERM exits 143."""
    signal.signal(signal.SIGTERM, _terminate)
    plain_off_terminal()
    sys.exit(exit_code(main))


def exit_code(main: Callable[[], int]) -> int:
    """`main`'s exit code: bad input is one line on stderr, exit code 2 for an option out of range
    or in conflict (an OptionError: a usage error, as argparse's) and 1 for any other (an
    InputError: a missing file, an unreadable checkpoint); Ctrl-C exit code 130; anything else is
    a bug and keeps its traceback."""
    from ..errors import InputError, OptionError

    try:
        return main()
    except OptionError as e:
        return fail(str(e), 2)
    except InputError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def add_options(
    parser: argparse._ActionsContainer, cls, skip=(), defaults: dict | None = None, given_only=False, optional=()
):
    """One flag per field of dataclass `cls` (but those in `skip`), typed, with the help, range
    and default of the field's metadata (`diffusion.config.option`), or of `defaults`; a required
    field's flag is required unless named in `optional`. With `given_only`, a flag not given
    leaves no attribute (argparse.SUPPRESS), so that only the flags given override what comes
    before them (a preset, a file)."""
    types = typing.get_type_hints(cls)
    own = vars(cls).get("__annotations__", {})  # the class's own fields first, then those it inherits
    for f in sorted(fields(cls), key=lambda f: f.name not in own):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default)
        kind = next(t for t in typing.get_args(types[f.name]) or (types[f.name],) if t is not type(None))
        bounds = "" if f.metadata.get("choices") else range_text(f)  # argparse shows choices itself
        help = f.metadata["help"] + (f" ({bounds})" if bounds else "")
        if given_only and "default" not in help:
            help += f" (default: {default!r})"
        extra = {"default": argparse.SUPPRESS if given_only else default, "help": help}
        if f.metadata.get("required") and f.name not in optional:
            extra = {"required": True, "help": f.metadata["help"]}
        flags = (flag, *f.metadata.get("aliases", ()))
        if kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **extra)
        else:
            parser.add_argument(*flags, type=kind, choices=f.metadata.get("choices"), **extra)


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of dataclass `cls` that are attributes of `args` (given as flags, or defaults)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def add_train_options(
    parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), argv: list[str] | None = None
) -> None:
    """--preset, --config FILE and a flag per option of a TrainJob (but those in `skip`), the
    recipe's and the run settings'; the defaults shown are those of the preset that `argv` (the
    command line's, by default) names."""
    parser.add_argument("--preset", default="cifar10", choices=sorted(PRESETS), help="recipe to start from")
    parser.add_argument("--config", default=None, help="YAML or JSON file of options (between preset and flags)")
    preset = Parser(prog=parser.prog, add_help=False)
    preset.add_argument("--preset", default="cifar10", choices=sorted(PRESETS))
    name = preset.parse_known_args(argv)[0].preset
    job = PRESETS[name]
    note = f"The defaults shown are the {name} preset's; --config and then the flags override them."
    add_options(
        parser.add_argument_group("recipe", f"What is trained. {note}"),
        Recipe,
        skip,
        {f.name: getattr(job.recipe, f.name) for f in fields(Recipe)},
        given_only=True,
    )
    add_options(
        parser.add_argument_group("run settings", "How and where it is trained."),
        RunSettings,
        skip,
        {f.name: getattr(job.settings, f.name) for f in fields(RunSettings)},
        given_only=True,
    )


def train_job(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainJob:
    """The TrainJob the options describe: the preset, then the --config file, then the flags
    given. `fit` checks it, once."""
    file_options = read_options_file(Path(args.config), parser, "--config") if args.config else {}
    return job_from(args.preset, file_options, {**given(args, Recipe), **given(args, RunSettings)})


def read_options_file(path: Path, parser: argparse.ArgumentParser, flag: str, known: set[str] | None = None) -> dict:
    """A YAML or JSON mapping whose keys are all `known` (a TrainJob's options by default)."""
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
    allowed = known if known is not None else RECIPE_FIELDS | RUN_FIELDS
    unknown = sorted(set(values) - allowed)
    if unknown:
        hint = f"; choose from {sorted(known)}" if known is not None else " (see --help)"
        parser.error(f"{flag} {path}: unknown option(s) {unknown}{hint}")
    return values


def add_search_options(parser: argparse.ArgumentParser) -> None:
    """A flag per searchable recipe option (SEARCHABLE): --search-lr LOW HIGH for a continuous
    one, --search-schedule linear cosine for one chosen among values; and --space FILE."""
    group = parser.add_argument_group(
        "search space",
        "Each flag sets one option's distribution over the default space "
        + ", ".join(f"{k} {next(iter(v))} {next(iter(v.values()))}" for k, v in DEFAULT_SPACE.items())
        + "; --space FILE replaces them all.",
    )
    types, recipe_fields = typing.get_type_hints(Recipe), {f.name: f for f in fields(Recipe)}
    for name, distribution in SEARCHABLE.items():
        f, flag = recipe_fields[name], "--search-" + name.replace("_", "-")
        if distribution in ("loguniform", "uniform"):
            group.add_argument(
                flag, type=float, nargs=2, metavar=("LOW", "HIGH"), help=f"{f.metadata['help']}: {distribution}"
            )
        else:
            kind = types[name]
            choices = f.metadata.get("choices")
            group.add_argument(flag, type=kind, nargs="+", choices=choices, help=f"{f.metadata['help']}: choose among")
    group.add_argument("--space", default=None, help="YAML/JSON search space (replaces the flags above)")


def search_space(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The space the options give: --space FILE, or the default space with each --search-* flag's."""
    if args.space:
        return read_options_file(Path(args.space), parser, "--space", known=set(SEARCHABLE))
    space = dict(DEFAULT_SPACE)
    for name, distribution in SEARCHABLE.items():
        values = getattr(args, "search_" + name)
        if values is not None:
            space[name] = {distribution: values}
    return space


def add_sampler_options(parser: argparse.ArgumentParser, **defaults) -> None:
    """A flag per SamplerSettings field (--sampler, --steps, --eta, ...; `defaults` override
    theirs) and per Speed field (--precision, --compile)."""
    group = parser.add_argument_group("sampler")
    add_options(group, SamplerSettings, defaults=defaults)
    add_options(group, Speed)


def sampler_settings(args: argparse.Namespace) -> SamplerSettings:
    """The settings the flags give, checked as far as they can be before the model's T is known
    (an OptionError naming each setting out of range or in conflict)."""
    return SamplerSettings(**given(args, SamplerSettings))


def sampler_speed(args: argparse.Namespace) -> Speed:
    return Speed(**given(args, Speed))


def add_checkpoint_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """A flag per CheckpointOptions field: --checkpoint (anything a checkpoint can be; unless
    `required`, it may be left out), --which, --weights, --endpoint-url."""
    add_options(
        parser.add_argument_group("checkpoint"), CheckpointOptions, optional=() if required else ("checkpoint",)
    )


def checkpoint_options(args: argparse.Namespace) -> CheckpointOptions:
    return CheckpointOptions(**given(args, CheckpointOptions))


def seed_list(text: str) -> tuple[int, ...]:
    """EDM-style seeds: `0-63`, `5`, `0-9,100-109` (ranges inclusive), each seed once, in order
    (`batch_sample.seeds_text` writes them back so)."""
    seeds: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not (first.isdigit() and (last.isdigit() if dash else True)) or (dash and int(last) < int(first)):
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a seed or a range FIRST-LAST (e.g. 0-63)")
        seeds.extend(range(int(first), int(last if dash else first) + 1))
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} names a seed twice")
    return tuple(seeds)


def add_sampling_options(
    parser: argparse.ArgumentParser, n: int, batch_size: int, workers: bool, output: bool = True, **sampler_defaults
) -> None:
    """What jobs/generate.py, jobs/sample.py and jobs/evaluate.py share: the checkpoint, the
    seeds (--seeds, or --n for 0 .. n-1), the model batch, with `workers` the Ray actors and
    the MLflow experiment, the sampler (`sampler_defaults` override its defaults); with
    `output`, the output folder and the papers' figures."""
    add_checkpoint_options(parser)
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seeds", type=seed_list, default=tuple(range(n)), help=f"seeds, e.g. 0-63 or 0-9,100 (default: 0-{n - 1})"
    )
    seeds.add_argument("--n", type=int, default=None, help="number of images: seeds 0 .. n-1 (instead of --seeds)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per model batch")
    parser.add_argument(
        "--classes",
        default=None,
        help="classes to draw from a class-conditional model: names or indices and ranges FIRST-LAST, "
        "comma-separated (0-9, cat,dog); each class from every seed (default: class seed mod the number of classes)",
    )
    if workers:  # a Ray job, tracked in MLflow
        parser.add_argument("--workers", type=int, default=0, help="Ray actors (0: one per GPU, or 1)")
        add_options(parser, Tracking)
    add_sampler_options(parser, **sampler_defaults)
    if not output:
        return
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out", default="samples", help="folder for one PNG per seed and samples.png, a grid of the first 64"
    )
    out.add_argument(
        "--figures", action="store_true", help="also the papers' figures, in OUT/figures/ (costs printed first)"
    )
    out.add_argument(
        "--full-figures",
        action="store_true",
        help="the figures with the papers' most expensive rows (implies --figures)",
    )
    out.add_argument("--figure-seeds", type=int, default=8, help="seeds per figure (an even number)")
    out.add_argument("--data", default=None, help="prepared data set: two of its images for the DDPM interpolation")


def seeds_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[int, ...]:
    """The seeds the options name (--seeds, or --n), the batch, class and figure options checked."""
    if args.classes is not None:
        from ..classes import parse

        parse(args.classes)  # an empty item: an OptionError now, before any checkpoint is read
    if args.n is not None and args.n < 1:
        parser.error("--n must be >= 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    figure_seeds = getattr(args, "figure_seeds", 2)  # evaluate.py has no figures
    if figure_seeds < 2 or figure_seeds % 2:
        parser.error("--figure-seeds must be an even number >= 2 (interpolations take seeds in pairs)")
    return tuple(range(args.n)) if args.n is not None else args.seeds


def sampling_job(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The SamplingJob the options describe (a parser error names a bad option)."""
    settings = sampler_settings(args)
    seeds = seeds_of(args, parser)
    from .batch_sample import SamplingJob
    from .resources import Workers

    return SamplingJob(
        **given(args, CheckpointOptions),
        **given(args, Tracking),
        seeds=seeds,
        classes=args.classes,
        settings=settings,
        speed=sampler_speed(args),
        batch_size=args.batch_size,
        workers=Workers(count=args.workers),
    )
