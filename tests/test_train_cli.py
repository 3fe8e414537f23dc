"""jobs/train.py's options: presets, a YAML/JSON file, flags, and clear errors (no Ray started)."""

import importlib.util
import json

import pytest

from diffusion.config import Recipe
from diffusion.platform.settings import PRESETS, RunSettings, TrainJob
from diffusion.training import lr_at, recipe_unet
from diffusion.unet import build_unet
from helpers import ROOT, run_main

spec = importlib.util.spec_from_file_location("train_cli", ROOT / "jobs" / "train.py")
train_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_cli)


def test_presets_follow_the_ddpm_recipe():
    c = PRESETS["cifar10"].recipe
    assert (c.model, c.lr, c.warmup_steps, c.batch_size, c.grad_clip, c.ema_decay, c.dropout, c.flip, c.max_steps) == (
        "cifar10",
        2e-4,
        5000,
        128,
        1.0,
        0.9999,
        0.1,
        True,
        800_000,
    )
    assert (c.schedule, c.num_timesteps, c.beta_start, c.beta_end) == ("linear", 1000, 1e-4, 0.02)
    assert PRESETS["stl10"].recipe.model == "stl10" and PRESETS["tiny"].recipe.model == "tiny"
    digits = PRESETS["digits"].validate()  # the recipe bench/quality.py measured (README: 12m40s on 2 cores)
    assert (digits.recipe.model, digits.recipe.flip, digits.settings.data) == ("digits", False, "data/digits")
    classes = PRESETS["cifar10-classes"].validate()  # CIFAR-10's ten classes; its weights fit a 16 MB release
    assert (classes.recipe.num_classes, classes.settings.sample_guidance, classes.settings.sample_n) == (10, 3.0, 80)
    assert 2 * sum(p.numel() for p in build_unet(recipe_unet(classes.recipe)).parameters()) < 16e6  # float16


def test_learning_rate_warms_up_linearly_then_stays():
    c = PRESETS["cifar10"].recipe
    assert lr_at(c, 0) == pytest.approx(2e-4 / 5000)
    assert lr_at(c, 2499) == pytest.approx(1e-4)
    assert lr_at(c, 4999) == lr_at(c, 700_000) == 2e-4


def test_flags_override_the_file_which_overrides_the_preset(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.0005\nschedule: cosine\nmax_steps: 99\n")
    config = train_cli.parse_args(
        [
            "--preset",
            "tiny",
            "--config",
            str(tmp_path / "c.yaml"),
            "--max-steps",
            "7",
            "--no-flip",
            "--num-workers",
            "2",
        ]
    )
    assert isinstance(config, TrainJob)
    config = config.to_dict()
    assert (
        config["model"],
        config["lr"],
        config["schedule"],
        config["max_steps"],
        config["flip"],
        config["num_workers"],
    ) == (
        "tiny",
        5e-4,
        "cosine",
        7,
        False,
        2,
    )
    (tmp_path / "c.json").write_text(json.dumps({"batch_size": 32, "ema_decay": 0.999}))
    config = train_cli.parse_args(["--config", str(tmp_path / "c.json")]).recipe
    assert (config.model, config.batch_size, config.ema_decay) == ("cifar10", 32, 0.999)


def test_every_config_field_is_a_flag_with_help_and_default():
    out = run_main("jobs/train.py", "--help").stdout
    for name in [*Recipe.__dataclass_fields__, *RunSettings.__dataclass_fields__]:
        assert "--" + name.replace("_", "-") in out
    out = " ".join(out.split())  # argparse wraps lines where it likes
    assert "(> 0) (default: 0.0002)" in out and "(default: 'linear')" in out


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--schedule", "sigmoid"], 2, "argument --schedule: invalid choice: 'sigmoid'"),
        (["--data-on-device", "gpu"], 2, "argument --data-on-device: invalid choice: 'gpu'"),
        (["--preset", "imagenet"], 2, "invalid choice: 'imagenet'"),
        (["--config", "/nonexistent.yaml"], 2, "--config /nonexistent.yaml does not exist"),
        # values in range of their type but not of the option: the job's one check, before anything
        # starts; a usage error too
        (["--lr", "-1"], 2, "error: lr must be > 0, got -1.0"),
        (
            ["--max-steps", "0", "--ema-decay", "1"],
            2,
            "error: ema_decay must be in [0, 1), got 1.0; max_steps must be >= 1, got 0",
        ),
        (["--fid-every", "10", "--fid-n", "1"], 2, "error: fid_n must be >= 2, got 1"),
    ],
)
def test_bad_options_are_named(args, code, message):
    proc = run_main("jobs/train.py", *args)
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")  # one line: no usage block


def test_unknown_keys_in_a_config_file_are_named(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1}))
    proc = run_main("jobs/train.py", "--config", tmp_path / "bad.json")
    assert proc.returncode == 2 and "unknown option(s) ['learning_rate']" in proc.stderr


def test_missing_data_set_is_a_clear_error(tmp_path):
    proc = run_main("jobs/train.py", "--preset", "tiny", "--data", tmp_path / "none")
    assert proc.returncode == 1 and "no manifest.json at" in proc.stderr and "prepare_data.py" in proc.stderr


def test_a_class_count_that_is_not_the_data_sets_is_named_before_ray_starts(digits_shards, tmp_path):
    proc = run_main("jobs/train.py", "--preset", "tiny", "--data", digits_shards, "--num-classes", "3")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"num_classes 3 does not match {digits_shards}, which has 10 classes (0, 1, 2" in proc.stderr
    assert proc.stderr.rstrip().endswith("give --num-classes 10")
    proc = run_main("jobs/train.py", "--class-dropout", "1.5")
    assert proc.returncode == 2 and "class_dropout must be in [0, 1], got 1.5" in proc.stderr
