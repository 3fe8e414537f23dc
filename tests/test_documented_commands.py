"""Every command README.md and docs/*.md show, and every script under bench/, run at smoke size, so
that a renamed function, field or flag fails CI instead of a user.

The commands come from the Markdown: each line of a shell code block (split at `&&`, `;` and `|`,
backslash continuations joined; a comment that is itself a command, `#   python jobs/...`, counts)
and each inline `code` span that starts with a program (python, curl, ray, pip, ...; a script
named without its program is prose, e.g. `jobs/sample.py --workers 2`). Exactly one rule of
COVERAGE, a regex on the command's text (`<placeholders>` read as ID), says how each is covered,
or `test_every_documented_command_is_covered_once` fails:

- RUN: the smoke test named runs it (`documented(test)` hands the test its commands from the
  docs) at smoke size, by the rule written in that test: the same script and flags, with
  size-limiting flags added and values replaced (`smoke_args`: 2 seeds, DDIM-2, batch 2, the test
  data sets, tmp folders and the test bucket). One real training run, README's main job
  `python jobs/train.py --preset tiny` at smoke size on `cifar_shards` with T = 10 (DDPM chains
  and the papers' figures then cost a few model calls), is the checkpoint that every command
  consuming one reads (generate, sample, export, serve and its curl requests, sent with
  urllib).
- REUSED: an existing test elsewhere runs exactly this command (an anchored pattern: a change in
  the docs comes back here), so that it does not run twice.
- PARSED: it differs from a RUN command (or from what the named test runs) only in flag values,
  or a value needs what EXCEPTED names; the test named runs its code path.
- EXCEPTED: it needs a GPU, a cluster, the internet or files a user brings, as the reason says.

Whatever its rule, every documented `python SCRIPT`, `mlflow` and `serve` command goes through its
own argument parser (`test_documented_commands_use_flags_their_cli_accepts`, the quick tier), as
cluster/'s commands do in tests/test_cluster_configs.py with the same extractor. Every script
under bench/ has a smoke run (BENCH): its documented command's, or its own at smoke size.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import re
import shlex
import signal
import subprocess
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, SHARED_CIFAR, free_port, npz, run_main, script_module, write_cifar10

# --- the commands in the Markdown ------------------------------------------------------------------

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = set("python python3 bash sh curl serve ray mlflow pip huggingface-cli source .".split())
# A script of this project, also as a cluster node runs it (where the project is installed there).
PROJECT_SCRIPT = re.compile(r"(?:~/ray-diffusion/|/home/ray/ray-diffusion/)?((?:jobs|tune|bench|cluster)/\w+\.py)")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=")
PLACEHOLDER = re.compile(r"<[^<>\n]*>")  # runs:/<mlflow run id>
FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.S | re.M)
SHELL_FENCES = {"bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&"}


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]

    @classmethod
    def of(cls, text: str) -> Command:
        return cls(tuple(shlex.split(text)))

    def __str__(self) -> str:
        return shlex.join(self.argv)

    @property
    def program(self) -> str:
        return next(word for word in self.argv if not ENV_ASSIGNMENT.match(word))

    @property
    def script(self) -> tuple[str, tuple[str, ...]] | None:
        """The project script the command runs with Python, and its arguments (also after
        `ray job submit ... --`); None if it runs none."""
        for i, word in enumerate(self.argv[:-1]):
            found = PROJECT_SCRIPT.fullmatch(self.argv[i + 1])
            if word in ("python", "python3") and found:
                return found[1], self.argv[i + 2 :]
        return None


def starts_a_command(text: str) -> bool:
    """Whether `text` (an inline span, a comment, a YAML string) starts with a program, VAR=value
    assignments aside."""
    words = [w for w in text.split() if not ENV_ASSIGNMENT.match(w)]
    return bool(words) and words[0] in PROGRAMS


def shell_commands(text: str) -> list[Command]:
    """The commands of shell text; a comment line counts when it is itself a command."""
    commands = []
    for line in PLACEHOLDER.sub("ID", text.replace("\\\n", " ")).splitlines():
        line = line.strip()
        if line.startswith("#"):
            line = line.lstrip("#")
            if not starts_a_command(line):
                continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True  # words end at blanks and at operators only
        words: list[str] = []
        for word in [*lexer, "&&"]:
            if word not in SEPARATORS:
                words.append(word)
            elif words:
                commands.append(Command(tuple(words)))
                words = []
    return commands


def markdown_commands(text: str) -> list[Command]:
    """The commands of a Markdown text: its shell code blocks' and its inline ones."""
    commands = [c for block in FENCE.finditer(text) if block[1] in SHELL_FENCES for c in shell_commands(block[2])]
    for span in re.findall(r"`([^`]+)`", FENCE.sub("", text)):
        span = " ".join(span.split())
        if starts_a_command(span):
            commands += shell_commands(span)
    return commands


def documented_commands() -> dict[str, list[str]]:
    """Every command of README.md and docs/*.md: its text -> the files that show it."""
    found: dict[str, list[str]] = {}
    for path in DOCS:
        for command in markdown_commands(path.read_text()):
            found.setdefault(str(command), []).append(str(path.relative_to(ROOT)))
    return found


def test_the_extractor_finds_commands_in_blocks_comments_and_prose():
    text = (
        "Prose with `python jobs/x.py --a 1`, `--flag` and `jobs/x.py --flag`, and\n"
        "```bash\n# A comment, then one that is a command:\n#   python jobs/y.py --b\n"
        "A=1 python bench/z.py --c \\\n    --d runs:/<run id> && curl -s -d '{\"n\": 1}' x  # trailing\n```\n"
        "```python\nimport diffusion\n```\n"
    )
    assert [str(c) for c in markdown_commands(text)] == [
        "python jobs/y.py --b",
        "A=1 python bench/z.py --c --d runs:/ID",
        "curl -s -d '{\"n\": 1}' x",
        "python jobs/x.py --a 1",
    ]
    assert Command(("ray", "job", "submit", "--", "python", "jobs/t.py", "--p")).script == ("jobs/t.py", ("--p",))


# --- how each is covered -------------------------------------------------------------------------

CLUSTER = "a cluster (tests/test_cluster_e2e.py runs the stack and these jobs end to end)"
GPU = "a GPU"
DOWNLOAD = "the internet: downloads the official archive (tests/test_download.py serves one locally)"
SETUP = "sets up the environment the tests run in (pip: the internet)"
USER_WEIGHTS = "files a user brings: the published DDPM weights (tests/test_convert.py reads both layouts)"

COVERAGE: dict[str, dict[str, str]] = {
    "RUN": {
        r"^python jobs/prepare_data\.py --dataset imagefolder --source \.\./shared/": "prepared",
        r"^python jobs/prepare_data\.py --dataset cifar10 --source ": "prepared",
        r"^python jobs/prepare_data\.py --dataset digits$": "prepared",
        r"^python jobs/train\.py --preset tiny$": "trained",
        r"^python jobs/generate\.py --checkpoint runs/tiny-linear --seeds 0-63 --out samples$": "test_generate",
        r"^python jobs/generate\.py --checkpoint runs/tiny-linear --seeds 0-7 --out figures --figures": "test_generate",
        r"^python jobs/export\.py(?! --checkpoint runs/mine)": "test_export",
        r"^python jobs/sample\.py --checkpoint runs:/ID .*--figures --out s3://": "test_sample",
        r"^python jobs/serve\.py --checkpoint runs/tiny-linear$": "test_serve",
        r"^curl -s -X POST 127\.0\.0\.1:8000/|^curl -N -X POST 127\.0\.0\.1:8000/": "test_serve",
        r"^python bench/quality\.py --checkpoint runs/": "test_bench_quality",
        r"^python bench/load\.py$": "test_bench_load",
    },
    "REUSED": {
        r"^python bench/speed\.py --smoke$": "tests/test_bench_speed.py::test_smoke_run_writes_json_and_markdown",
        r"^python bench/speed\.py --device cpu --profile --out bench/results/$": (
            "tests/test_bench_speed.py::test_runs_report_the_ratio_spread_and_the_profile_ranks_both_steps"
        ),
        r"^python bench/core\.py --smoke$": "tests/test_entry_points.py::test_bench_smoke_writes_json",
        r"^bash bench/gpu\.sh --help$": (
            "tests/test_entry_points.py::test_the_gpu_script_prints_its_usage_and_refuses_unknown_arguments"
        ),
    },
    "PARSED": {
        r"^python jobs/train\.py --preset (cifar10|digits)": "trained",
        r"^python jobs/sample\.py --checkpoint runs/tiny-linear ": "test_sample",
        r"^python jobs/generate\.py .*--sampler dpmpp_2m": (
            "tests/test_entry_points.py::test_generate_writes_a_png_per_seed_with_each_sampler_counting_model_calls"
        ),
        r"^python jobs/generate\.py --checkpoint runs/digits-classes ": (
            "tests/test_entry_points.py::test_generate_draws_each_class_asked_from_every_seed_into_a_folder_per_class"
        ),
        r"^python jobs/evaluate\.py --checkpoint (runs/cifar10-linear|runs:/ID) ": (
            "tests/test_evaluate.py::test_evaluation_pipeline_logs_fid_and_every_setting"
        ),
        r"^python jobs/evaluate\.py --checkpoint runs/digits-linear ": (
            "tests/test_digits.py::test_evaluate_measures_fd_digits_with_the_floor_and_logs_them"
        ),
        r"^python jobs/evaluate\.py --checkpoint runs/cifar10-cpu-linear ": (
            "tests/test_cifar10_cpu.py::test_evaluate_judges_cifar10_with_the_kept_judge_where_no_inception_weights_are_at_hand"
        ),
        r"^python bench/quality\.py --checkpoint tests/fixtures/digits-ci-classes ": (
            "tests/test_quality.py::test_guidance_draws_the_digit_asked_for"
        ),
        r"^python bench/cifar10_judge\.py": "tests/test_cifar10_cpu.py::test_the_judge_script_trains_resumes_and_records",
        r"^python bench/cpu_training\.py": "tests/test_cifar10_cpu.py::test_the_cpu_training_bench_compares_every_choice",
        r"^bash bench/gpu\.sh --quality-smoke$": "tests/test_cifar10_cpu.py::test_the_gpu_quality_run_runs_its_steps_at_smoke_size",
        r"^python jobs/\w+\.py .*(~/pictures|data/mine|runs/mine)": (
            "tests/test_own_images.py::test_an_image_folder_of_64x64_images_end_to_end"
        ),
        r"^python tune/sweep\.py": "tests/test_sweep.py::swept",  # the CLI, 3 trials with ASHA
        r"^python tune/screenshot\.py --sweep": "tests/test_sweep.py::test_the_compare_page_screenshot_shows_the_trials",
        r"^python tune/screenshot\.py --run": "tests/test_mlflow_models.py::test_the_run_page_shows_the_models_and_the_sample_grid",
        r"^mlflow ui": "trained",  # training prints it with its store; MLflow's own parser reads its flags
        r"^serve run jobs/serve_config\.yaml$": "test_serve",  # build_app with the config's args
    },
    "EXCEPTED": {
        r"^(python3 -m venv|\. \.venv/bin/activate|pip install)": SETUP,
        r"^python -m pytest": "the test suite itself",
        r"jobs/prepare_data\.py --dataset (cifar10|stl10)(?! .*--source)": DOWNLOAD,
        r"^huggingface-cli download": "the internet: the DDPM weights from the Hugging Face hub",
        r"--checkpoint weights/ddpm-cifar10-32": USER_WEIGHTS,
        r"--device cuda|--gpus 1|--gpus-per-worker 1|^bash bench/gpu\.sh --quality$": GPU,
        r"^ray (job submit|dashboard)|^source \.stack/env|^serve shutdown|cluster/stack\.py": CLUSTER,
        r"^curl .*\$\{RAY_ADDRESS": CLUSTER,
    },
}


def rules_of(text: str) -> list[tuple[str, str, str]]:
    """The (kind, pattern, target) rules of COVERAGE that match a command's text."""
    return [(kind, p, target) for kind, rules in COVERAGE.items() for p, target in rules.items() if re.search(p, text)]


def documented(test: str) -> list[Command]:
    """The documented commands RUN by `test` (at least one)."""
    commands = [
        Command.of(text)
        for text in documented_commands()
        if [(kind, target) for kind, _, target in rules_of(text)] == [("RUN", test)]
    ]
    assert commands, f"no documented command is run by {test}"
    return commands


def test_every_documented_command_is_covered_once():
    uncovered = {text: where for text, where in documented_commands().items() if len(rules_of(text)) != 1}
    assert not uncovered, (
        "each documented command needs exactly one rule in COVERAGE (RUN it at smoke size, or name why "
        "not):\n"
        + "\n".join(f"{where}: {text}  <- {[r[1] for r in rules_of(text)]}" for text, where in uncovered.items())
    )


def defined(test: str) -> bool:
    """Whether `test`, a name in this file or FILE::NAME, is a test (or fixture) defined there."""
    file, _, name = test.rpartition("::")
    return bool(re.search(rf"^def {name}\(", (ROOT / file if file else Path(__file__)).read_text(), re.M))


def test_every_rule_covers_a_documented_command_and_names_a_real_test():
    texts = list(documented_commands())
    for kind, rules in COVERAGE.items():
        for pattern, target in rules.items():
            assert any(re.search(pattern, t) for t in texts), f"{kind} rule {pattern!r} matches no documented command"
            assert kind == "EXCEPTED" or defined(target), f"{kind} rule {pattern!r}: no test {target}"


def written_paths(command: Command) -> list[str]:
    """The local paths a documented project command writes: its --out, --storage and --json values."""
    script = command.script
    args = script[1] if script else ()
    flags = ("--out", "--storage", "--json")
    return [value for flag, value in itertools.pairwise(args) if flag in flags and "://" not in value]


def test_each_documented_command_writes_where_no_other_does():
    """No documented command overwrites another's output. Two kinds of command share one by
    design: the ways to prepare one data set (the official archive, a local copy, the JPEG copy),
    of which a user runs one; and a folder named with its trailing slash (bench/results/), where
    each command writes files of its own name."""
    writers: dict[str, set[str]] = {}
    for text in documented_commands():
        command = Command.of(text)
        if command.script and command.script[0] == "jobs/prepare_data.py":
            continue
        for path in written_paths(command):
            if not path.endswith("/"):
                writers.setdefault(path, set()).add(text)
    shared = {path: sorted(texts) for path, texts in writers.items() if len(texts) > 1}
    assert not shared, f"documented commands that write the same place: {shared}"


def test_what_the_readmes_commands_write_is_git_ignored():
    """README's commands write only where `git status` stays clean: their folders (and training's
    defaults, runs/ and mlflow.db)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    commands = markdown_commands((ROOT / "README.md").read_text())
    written = [f"{path}/written.png" for c in commands for path in written_paths(c)]
    assert {"data/cifar10/written.png", "samples/written.png", "figures/written.png"} <= set(written)
    written += ["runs/tiny-linear/checkpoint-000000200/checkpoint.pt", "mlflow.db"]
    cmd = ["git", "check-ignore", "--no-index", *written]
    check = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True)  # exit 1: some not ignored
    assert sorted(check.stdout.split()) == sorted(written), (
        f"not git-ignored: {set(written) - set(check.stdout.split())}"
    )


# --- parse checks (the quick tier) -------------------------------------------------------------------


class _Parsed(Exception):
    pass


def parse_command(script: str, argv):
    """A command's arguments through its script's own parser: jobs/train.py's parse_args (with the
    job's validation, as `fit` checks it), or any other script's main() stopped right after its
    parser accepted them. `--config FILE` of a reader's own file (absent here: my.yaml) is left out."""
    argv = list(argv)
    if "--config" in argv and not (ROOT / argv[argv.index("--config") + 1]).exists():
        del argv[argv.index("--config") : argv.index("--config") + 2]
    module, parse, stderr = script_module(script), argparse.ArgumentParser.parse_args, io.StringIO()

    def parse_then_stop(parser, args=None, namespace=None):
        raise _Parsed(parse(parser, args, namespace))

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        try:
            if script == "jobs/train.py":
                return module.parse_args(argv).validate()
            patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
            module.main(argv)
        except _Parsed as parsed:
            return parsed.args[0]
        except SystemExit as e:
            if e.code == 0 and "--help" in argv:
                return None
            pytest.fail(f"{script} rejects {' '.join(argv)}:\n{stderr.getvalue()}")
    pytest.fail(f"{script} ran past its argument parsing")


def parse_click_command(command: Command) -> None:
    """An `mlflow ...` or `serve ...` command through MLflow's or Serve's own (click) parser; a
    Serve config file also through Serve's schema, and its application's args through build_app's."""
    import click

    if command.program == "mlflow":
        from mlflow.cli import cli
    else:
        from ray.serve.scripts import cli
    name, *args = command.argv[1:]
    context = click.Context(cli)
    sub = cli.get_command(context, name)
    assert sub is not None, f"{command}: {command.program} has no command {name!r}"
    config = sub.make_context(name, args, parent=context).params.get("config_or_import_path", "")
    if config.endswith(".yaml"):
        from ray.serve.schema import ServeDeploySchema

        from diffusion.platform.serve import serve_args

        for app in ServeDeploySchema.model_validate(yaml.safe_load((ROOT / config).read_text())).applications:
            assert app.import_path == "diffusion.platform.serve:build_app"
            serve_args(app.args)


PARSEABLE = [t for t in documented_commands() if Command.of(t).script or Command.of(t).program in ("mlflow", "serve")]


@pytest.mark.parametrize("text", PARSEABLE, ids=str)
def test_documented_commands_use_flags_their_cli_accepts(text):
    command = Command.of(text)
    if command.script:
        parse_command(*command.script)
    else:
        parse_click_command(command)


def test_a_wrong_flag_fails_the_command_check():
    import click

    with pytest.raises(pytest.fail.Exception, match="rejects"):
        parse_command("jobs/train.py", ("--preset", "cifar10", "--workers", "8"))
    with pytest.raises(pytest.fail.Exception, match="rejects"):
        parse_command("jobs/sample.py", ("--checkpoint", "s3://b/r", "--out", "o", "--gpus", "1"))
    with pytest.raises(click.UsageError):
        parse_click_command(Command(("mlflow", "ui", "--backend-store", "sqlite:///x.db")))


# --- the commands at smoke size -------------------------------------------------------------------


def smoke_args(args, replaced: dict | None = None, added: dict | None = None) -> list[str]:
    """A documented command's arguments at smoke size: each flag of `replaced` that the command
    gives takes the new value(s), each flag of `added` is set whether given or not ([] for a flag
    without values)."""
    assert not args or args[0].startswith("--"), args
    options: dict[str, list[str]] = {}
    for word in args:
        if word.startswith("--"):
            options[word] = []
        else:
            options[next(reversed(options))].append(word)
    options |= {flag: as_words(value) for flag, value in (replaced or {}).items() if flag in options}
    options |= {flag: as_words(value) for flag, value in (added or {}).items()}
    return [word for flag, values in options.items() for word in (flag, *values)]


def as_words(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def test_smoke_args_replace_given_values_and_add_limits():
    args = ("--seeds", "0-63", "--figures", "--splits", "train", "test")
    assert smoke_args(args, {"--seeds": "0-1", "--n": 2, "--splits": ["test"]}, {"--steps": 2, "--ddpm": []}) == [
        "--seeds", "0-1", "--figures", "--splits", "test", "--steps", "2", "--ddpm"
    ]  # fmt: skip


@dataclass(frozen=True)
class Trained:
    run: str  # the run folder, as the docs' runs/tiny-linear
    env: dict  # RAY_ADDRESS (the session's Ray) and MLFLOW_TRACKING_URI (this module's store)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_shards, ray_address, new_mlflow_store) -> Trained:
    """README's main job at smoke size, the checkpoint of every command that reads one: 2 steps on
    `cifar_shards`, T = 10 (DDPM chains of 10 model calls), small held-out set and sample grid.
    Its run folder is the docs' runs/tiny-linear (the name training derives), and its last line
    names the MLflow run with the `mlflow ui` command of README.md."""
    tmp = tmp_path_factory.mktemp("trained")
    env = {"RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": new_mlflow_store(tmp)}
    (command,) = documented("trained")
    limits = {"--max-steps": 2, "--num-timesteps": 10, "--heldout-size": 16, "--sample-n": 2, "--sample-steps": 2}
    args = smoke_args(command.script[1], added={"--data": cifar_shards, "--storage": tmp / "runs", **limits})
    proc = run_main("jobs/train.py", *args, ray=True, **env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    mlflow_ui = re.search(
        rf"^MLflow run (\w+): mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']},", proc.stdout, re.M
    )
    assert mlflow_ui, proc.stdout[-2000:]
    run = tmp / "runs" / "tiny-linear"
    assert f"latest checkpoint: {run}/checkpoint-000000002" in proc.stdout
    return Trained(str(run), env)


def shared_cifar_prefix(tmp_path: Path, count: int = 20) -> Path:
    """The shared CIFAR-10 copy's first `count` images, as a tar.gz of the same layout."""
    if not SHARED_CIFAR.exists():
        pytest.skip(f"real-data check skipped: {SHARED_CIFAR} is absent (it exists on developer machines and CI)")
    out = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(SHARED_CIFAR, "r|gz") as src, tarfile.open(out, "w:gz") as dst:
        for member in src:
            if member.isfile():
                dst.addfile(member, src.extractfile(member))
                count -= 1
                if not count:
                    break
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, s3_server) -> dict[str, str]:
    """Every documented prepare_data command at smoke size: the docs' data set (its --out, or
    data/<dataset>) -> where the first command to name it wrote it (README's main job, for
    data/cifar10). --source: the shared copy -> its first 20 images (train/airplane) in the same
    tar.gz layout; a user's cifar-10-python.tar.gz -> one in the official layout
    (helpers.write_cifar10) with its --md5. --out: a tmp folder, or a test bucket for s3://."""
    import boto3

    from diffusion.platform.shards import ShardSet

    tmp = tmp_path_factory.mktemp("prepared")
    archive = tmp / "cifar-10-python.tar.gz"
    write_cifar10(archive)
    inputs = {
        "imagefolder": {"--source": shared_cifar_prefix(tmp)},
        "cifar10": {"--source": archive, "--md5": hashlib.md5(archive.read_bytes()).hexdigest()},
        "digits": {},
    }
    boto3.client("s3").create_bucket(Bucket="documented-commands")
    data = {}
    for i, command in enumerate(documented("prepared")):
        args = command.script[1]
        dataset = args[args.index("--dataset") + 1]
        out = args[args.index("--out") + 1] if "--out" in args else f"data/{dataset}"
        uri = f"s3://documented-commands/data{i}" if out.startswith("s3://") else str(tmp / f"data{i}")
        proc = run_main("jobs/prepare_data.py", *smoke_args(args, added={**inputs[dataset], "--out": uri}))
        assert proc.returncode == 0 and len(ShardSet.open(uri)), f"{command}:\n{proc.stderr[-3000:]}"
        data.setdefault(out, uri)
    return data


def test_prepare_data(prepared):
    assert set(prepared) == {"data/cifar10", "data/cifar10-jpeg", "data/digits", "s3://ray-diffusion/data/cifar10"}


@pytest.mark.slow
def test_generate(trained, prepared, tmp_path):
    """--checkpoint -> the shared run; --seeds -> 0-1; --data data/cifar10 -> what README's main job
    prepared there; DDIM-2 at batch 2, and 2 figure seeds (with T = 10: 31 model calls)."""
    for i, command in enumerate(documented("test_generate")):
        out = tmp_path / f"samples{i}"
        replaced = {"--checkpoint": trained.run, "--seeds": "0-1", "--out": out, "--data": prepared["data/cifar10"]}
        args = smoke_args(command.script[1], replaced, {"--steps": 2, "--batch-size": 2, "--figure-seeds": 2})
        proc = run_main("jobs/generate.py", *args)
        assert proc.returncode == 0, f"{command}:\n{proc.stderr[-3000:]}"
        assert {p.name for p in out.glob("*.png")} == {"0000000000.png", "0000000001.png", "samples.png"}
        assert len(list(out.glob("figures/*.png"))) == (4 if "--figures" in args else 0), command


@pytest.mark.slow
def test_export(trained, tmp_path):
    """--checkpoint runs/cifar10-linear -> the shared run; --out -> a tmp folder."""
    pytest.importorskip("diffusers", reason="jobs/export.py needs diffusers: pip install 'ray-diffusion[diffusers]'")
    (command,) = documented("test_export")
    args = smoke_args(command.script[1], {"--checkpoint": trained.run, "--out": tmp_path / "exported"})
    proc = run_main("jobs/export.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "exported" / "model_index.json").is_file()


@pytest.mark.slow
def test_sample(trained, s3):
    """--checkpoint runs:/<id> -> the run's folder: the session's Ray workers, started before this
    module's MLflow store existed, cannot resolve its runs:/ URIs (a cluster's nodes can: they all
    have MLFLOW_TRACKING_URI). --out s3://bucket -> the test bucket."""
    import boto3

    (command,) = documented("test_sample")
    replaced = {"--checkpoint": trained.run, "--seeds": "0-1", "--out": f"s3://{s3}/samples/demo"}
    args = smoke_args(command.script[1], replaced, {"--steps": 2, "--batch-size": 2, "--figure-seeds": 2})
    proc = run_main("jobs/sample.py", *args, ray=True, **trained.env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    listing = boto3.client("s3").list_objects_v2(Bucket=s3, Prefix="samples/demo/")["Contents"]
    keys = {o["Key"].removeprefix("samples/demo/") for o in listing}
    assert {"0000000000.png", "0000000001.png", "samples.png", "sampling.json"} <= keys
    assert len([k for k in keys if k.startswith("figures/")]) == 4


def curl_request(command: Command, port: int) -> tuple[urllib.request.Request, dict, str | None]:
    """A documented curl request as a urllib POST to `port`, its JSON body at smoke size (at most 2
    images and 3 interpolation points, DDIM with 2 steps: the default 50 is more than the model's
    T = 10), with that body and the file the response goes to (-o; None for a stream)."""
    words, headers, body, out, url = list(command.argv[1:]), {}, {}, None, ""
    while words:
        word = words.pop(0)
        if word in ("-s", "-N"):  # silent; no buffering
            continue
        value = words.pop(0) if word.startswith("-") else None
        if word == "-H":
            name, _, header = value.partition(":")
            headers[name.strip()] = header.strip()
        elif word == "-d":
            body = json.loads(value)
        elif word == "-o":
            out = value
        elif word != "-X":  # POST, as a body implies
            url = "http://" + word.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    limits = {"n": 2, "count": 3}
    body = {key: min(value, limits[key]) if key in limits else value for key, value in body.items()}
    body |= {} if body.get("sampler") == "ddpm" else {"steps": 2}  # DDPM takes all T = 10 steps
    return urllib.request.Request(url, json.dumps(body).encode(), headers), body, out


@pytest.mark.slow
def test_serve(trained):
    """jobs/serve.py with --detach (it returns once deployed, as on a cluster), a free --port and
    --batch-size 2; the documented curl requests through urllib; then Serve is shut down."""
    from ray import serve

    commands = documented("test_serve")
    (server,) = [c for c in commands if c.script]
    port = free_port()
    args = smoke_args(
        server.script[1], {"--checkpoint": trained.run}, {"--port": port, "--batch-size": 2, "--detach": []}
    )
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # serve.py sets its own
    try:
        proc = run_main("jobs/serve.py", *args, ray=True, **trained.env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for command in [c for c in commands if c.program == "curl"]:
            request, body, out = curl_request(command, port)
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    data = response.read()
            except urllib.error.HTTPError as e:
                pytest.fail(f"{command}: {e.code} {e.read()[:500]}")
            if out is None:  # a progress stream
                assert data.count(b"event: progress") == body["steps"] and b"event: result" in data, command
            elif out.endswith(".npz"):
                assert npz(data).shape == (len(body["seeds"]), 32, 32, 3), command
            else:
                assert data.startswith(b"\x89PNG"), command
    finally:
        serve.shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# --- every script under bench/ ---------------------------------------------------------------------

BENCH = {  # script -> the test that runs it at smoke size
    "bench/core.py": "tests/test_entry_points.py::test_bench_smoke_writes_json",
    "bench/speed.py": "tests/test_bench_speed.py::test_smoke_run_writes_json_and_markdown",
    "bench/gpu.sh": "tests/test_entry_points.py::test_the_gpu_script_runs_its_steps_at_smoke_size",
    "bench/preflight.py": "tests/test_entry_points.py::test_the_gpu_script_runs_its_steps_at_smoke_size",  # its step 0
    "bench/quality.py": "test_bench_quality",
    "bench/curve.py": "tests/test_quality.py::test_the_curve_script_judges_each_checkpoint_once",
    "bench/load.py": "test_bench_load",
    "bench/data.py": "test_bench_data",
    "bench/scaling.py": "test_bench_scaling",
    "bench/sampling.py": "test_bench_sampling",
    "bench/cifar10_judge.py": "tests/test_cifar10_cpu.py::test_the_judge_script_trains_resumes_and_records",
    "bench/cpu_training.py": "tests/test_cifar10_cpu.py::test_the_cpu_training_bench_compares_every_choice",
    "bench/gpu_quality.py": "tests/test_cifar10_cpu.py::test_the_gpu_quality_run_runs_its_steps_at_smoke_size",
}


def test_every_bench_script_has_a_smoke_run():
    assert {str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.*")} == set(BENCH)
    assert all(defined(test) for test in BENCH.values())


@pytest.mark.slow
def test_bench_quality(trained_digits, digits_shards, tmp_path):
    """--checkpoint: the tests' trained digits run (a CIFAR-10 command's --weights and --clip
    kept); N = 2 samples, DDIM-2, one eta and spacing, no sigma-hat and no DDPM-1000 rows."""
    commands = documented("test_bench_quality")
    # the digits grid and its DPM-Solver++ rows; the CIFAR-10 run judged with its x_0 clipped, and its Table 1
    assert len(commands) == 4
    for i, command in enumerate(commands):
        out = tmp_path / str(i)
        replaced = {"--checkpoint": trained_digits, "--n": 2}
        added = {"--data": digits_shards, "--steps": 2, "--etas": 0, "--spacings": "uniform", "--no-sigma-hat": []}
        added |= {"--ddpm": [], "--solver-steps": [], "--batch-size": 2, "--out": out}
        proc = run_main("bench/quality.py", *smoke_args(command.script[1], replaced, added))
        assert proc.returncode == 0, f"{command}:\n{proc.stderr[-3000:]}"
        report = json.loads((out / "quality.json").read_text())
        assert [cell["cell"] for cell in report["cells"]] == ["ddim-2-0.0-uniform"]
        assert report["clip"] == (True if "--clip" in command.script[1] else None), command


@pytest.mark.slow
def test_bench_load(ray_address, tmp_path):
    """2 clients for 3 s against a T = 1000 model at batch 2, the first client's first request a
    DDPM chain (seed 10), 1000 model calls: on a CPU still running at the end, which cancels it."""
    (command,) = documented("test_bench_load")
    limits = {"--clients": 2, "--seconds": 3, "--seed": 10, "--batch-size": 2, "--progress-every": 1}
    limits["--json"] = tmp_path / "load.json"
    proc = run_main("bench/load.py", *smoke_args(command.script[1], added=limits), ray=True, RAY_ADDRESS=ray_address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kinds = json.loads((tmp_path / "load.json").read_text())["kinds"]
    assert kinds["ddim"]["requests"] and all(k["as_expected"] == 1 for k in kinds.values() if k["requests"]), kinds
    assert kinds["ddpm"]["cancelled_at_the_end"] >= 1 and "| cancelled at the end |" in proc.stdout, kinds
    assert re.search(
        r"^\d+/3 s: \d+ answered \(ddim \d+, ddpm \d+, health \d+, hostile \d+\)$", proc.stdout, re.MULTILINE
    )


@pytest.mark.slow
def test_bench_data(ray_address, s3, s3_server, tmp_path):
    """64 synthetic images, one pass each way, the session's S3 server."""
    args = ["--synthetic", 64, "--batch-size", 16, "--repeats", 1, "--s3-endpoint", s3_server, "--bucket", s3]
    proc = run_main("bench/data.py", *args, "--json", tmp_path / "data.json", ray=True, RAY_ADDRESS=ray_address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "data.json").read_text())["results"]
    assert [(r["storage"], r["reader"], r["images"]) for r in rows] == [
        (storage, reader, 64) for storage in ("local", "s3") for reader in ("plain", "ray_data")
    ]


@pytest.mark.slow
def test_bench_scaling(ray_address, tmp_path):
    """One worker count (1), 2 steps of batch 4 over 64 synthetic images."""
    args = ["--workers", 1, "--steps", 2, "--batch-size", 4, "--images", 64, "--json", tmp_path / "scaling.json"]
    proc = run_main("bench/scaling.py", *args, ray=True, RAY_ADDRESS=ray_address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "scaling.json").read_text())["results"]
    assert row["img_per_s"] > 0 and row["global_batch"] == 4


@pytest.mark.slow
def test_bench_sampling(ray_address, tmp_path):
    """1 client, 2 requests of DDIM-2, batch 2, a free port; the batch job on 2 images."""
    args = ["--clients", 1, "--requests", 2, "--steps", 2, "--batch-size", 2, "--job-images", 2, "--port", free_port()]
    proc = run_main("bench/sampling.py", *args, "--json", tmp_path / "s.json", ray=True, RAY_ADDRESS=ray_address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "s.json").read_text())
    assert [(r["mode"], r["clients"]) for r in result["serve"]] == [("batched", 1), ("unbatched", 1)]
    assert result["batch_job_img_per_s"] > 0
