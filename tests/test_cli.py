"""What every command line shares: bad input as one line naming the problem and the fix, exit
code 2 for a usage error (a flag unknown, malformed, out of range or in conflict) and 1 for the
rest, answered before torch, Ray or MLflow is imported; Ctrl-C 130; a Ray that cannot be started
or reached named with the fix."""

import pytest

from diffusion.errors import InputError, OptionError
from diffusion.platform import cli, resources


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    def bad_input():
        raise InputError("data/x has no manifest.json: prepare it first")

    with pytest.raises(SystemExit) as e:
        cli.run(bad_input)
    assert e.value.code == 1 and capsys.readouterr().err == "error: data/x has no manifest.json: prepare it first\n"

    def bad_option():
        raise OptionError("eta must be in [0, 1], got 1.5")

    with pytest.raises(SystemExit) as e:
        cli.run(bad_option)
    assert e.value.code == 2 and capsys.readouterr().err == "error: eta must be in [0, 1], got 1.5\n"

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        cli.run(interrupted)
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"

    def bug():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        cli.run(bug)


def test_a_ray_that_cannot_start_is_named_with_the_fix(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance.\nmore detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(resources.RayStartError) as e:
        resources.connect()
    message = str(e.value)
    assert "the Ray cluster at RAY_ADDRESS=10.0.0.1:6379 (Could not find any running Ray instance.)" in message
    assert "unset RAY_ADDRESS for a local Ray" in message and "more detail" not in message


COMMANDS = [
    "jobs/prepare_data.py",
    "jobs/train.py",
    "jobs/serve.py",
    "jobs/sample.py",
    "jobs/evaluate.py",
    "jobs/generate.py",
    "jobs/export.py",
    "tune/sweep.py",
    "tune/screenshot.py",
    "cluster/stack.py",
]


def without_heavy_imports(folder) -> dict:
    """The environment of a command that fails if it imports torch, Ray or MLflow."""
    import os
    import sys

    for name in ("torch", "ray", "mlflow"):
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('this must not import {name}')\n")
    return {"PYTHONPATH": os.pathsep.join([str(folder), *sys.path])}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_comes_before_torch_and_shows_every_default(command, tmp_path):
    """--help with torch, Ray and MLflow unimportable: argparse comes first. Every option shows
    its default once (or has none to show: a required option, a flag)."""
    import re

    from helpers import cli

    proc = cli(command, "--help", **without_heavy_imports(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    from helpers import ROOT

    named = set(re.findall(r"\b(?:jobs|tune|cluster|bench)/[\w./-]+\.(?:py|yaml|yml|json|sh)\b", proc.stdout))
    assert all((ROOT / path).is_file() for path in named), named  # the examples name files that exist
    options = re.split(r"\n  (?=-)", proc.stdout.split("options:", 1)[1])[1:]
    assert options
    for option in options:
        flag = option.split()[0].rstrip(",")
        if flag in ("-h", "--help") or "{" in flag:
            continue
        text = " ".join(option.split())
        assert "default" in text or "required" in text.lower() or flag.startswith("--no-"), text
        assert text.count("default:") <= 1, text  # not twice, as "default: in words (default: None)"


USAGE_ERRORS = [
    *[(command, ("--no-such-flag",), "error: ") for command in COMMANDS],  # or a required one named first
    ("jobs/generate.py", ("--checkpoint", "c", "--sampler", "ddpm", "--steps", "10"), "for fewer steps of the DDPM"),
    ("jobs/sample.py", ("--checkpoint", "c", "--eta", "1.5"), "eta must be in [0, 1], got 1.5"),
    ("jobs/train.py", ("--preset", "tiny", "--lr", "-1"), "lr must be > 0, got -1.0"),
    ("jobs/train.py", ("--preset", "imagenet"), "argument --preset: invalid choice: 'imagenet'"),
    ("tune/sweep.py", ("--preset", "tiny", "--search-lr", "1e-3"), "argument --search-lr: expected 2 arguments"),
    ("cluster/stack.py", ("up", "--hosts", "0"), "--hosts must be at least 1"),
]


@pytest.mark.parametrize("command, args, message", USAGE_ERRORS)
def test_a_usage_error_is_one_line_with_exit_code_2_before_torch(command, args, message, tmp_path):
    """An unknown flag, a malformed value and a value out of range or in conflict alike: one line
    naming it (argparse's own say where --help is), exit code 2, and torch, Ray and MLflow not
    imported."""
    from helpers import cli

    proc = cli(command, *args, **without_heavy_imports(tmp_path), timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not proc.stdout, proc.stderr  # no usage block
    if "--no-such-flag" in args or "argument" in message:  # argparse's own errors say where to look
        assert proc.stderr.endswith(f" (see {command.split('/')[-1]} --help)\n"), proc.stderr


@pytest.mark.parametrize("command", ["jobs/train.py", "tune/sweep.py"])
def test_training_help_shows_the_defaults_of_the_preset_given(command):
    from helpers import cli

    def shown(*args) -> str:
        proc = cli(command, *args, "--help", timeout=60)
        assert proc.returncode == 0, proc.stderr
        return " ".join(proc.stdout.split())

    cifar10, tiny = shown(), shown("--preset", "tiny")
    assert (
        "The defaults shown are the cifar10 preset's" in cifar10
        and "--max-steps MAX_STEPS training steps (>= 1) (default: 800000)" in cifar10
    )
    assert (
        "The defaults shown are the tiny preset's" in tiny
        and "--max-steps MAX_STEPS training steps (>= 1) (default: 200)" in tiny
    )
    assert "--log-every LOG_EVERY steps between progress lines and metrics (>= 1) (default: 10)" in tiny


def test_the_example_search_space_is_valid():
    import yaml

    from diffusion.platform.settings import validate_space
    from helpers import ROOT

    space = validate_space(yaml.safe_load((ROOT / "tune" / "space.yaml").read_text()))
    assert space == {"lr": {"loguniform": [5e-5, 1e-3]}, "schedule": {"grid": ["linear", "cosine"]}}


def test_seed_lists_read_as_edm_writes_them_and_back():
    from diffusion.platform.batch_sample import seeds_text

    seeds = cli.seed_list("0-3, 7,10-11")
    assert seeds == (0, 1, 2, 3, 7, 10, 11) and seeds_text(seeds) == "0-3,7,10-11"
    for bad in ("3-1", "a", "1-", "-2", "1,1"):
        with pytest.raises(Exception, match="not a seed or a range|names a seed twice"):
            cli.seed_list(bad)
