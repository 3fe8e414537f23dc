"""The checkpoint format across the split of the recipe from the run settings: a checkpoint
written before it (tests/fixtures/run-276a735, one flat `config`) loads, samples what that
version sampled, resumes and exports; checkpoints written now store the recipe, with the run
settings as information that loading never needs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion import RECIPES, Pipeline, Recipe, SamplerSettings, Speed, load_checkpoint, read_checkpoint
from diffusion.checkpoint import restore_state, save_checkpoint, unet_config_of
from diffusion.convert import is_diffusers_folder
from diffusion.errors import OptionError
from diffusion.images import to_model_input
from diffusion.pipeline import as_uint8_hwc
from diffusion.training import build_state, train_step
from helpers import run_main, tiny_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
OLD_RUN = FIXTURES / "run-276a735"  # as commit 276a735 wrote it (see fixtures/README.md)


def test_a_checkpoint_of_the_old_format_loads_its_recipe_and_leaves_its_run_settings():
    payload = read_checkpoint(OLD_RUN)
    assert "config" in payload and "recipe" not in payload  # the old format indeed
    assert payload["config"]["storage"] == "runs" and payload["config"]["log_every"] == 10  # run settings, unused
    model, ema, recipe = load_checkpoint(OLD_RUN, which="best")
    assert recipe == RECIPES["tiny"].replace(max_steps=20, seed=3, ema_warmup=False)  # older than the warm-up
    assert payload["step"] == 10 and model.config.ch_mult == (1,)  # its own UNet, recorded in `unet`


def test_it_samples_what_the_version_that_wrote_it_sampled():
    sampler = Pipeline.from_checkpoint(read_checkpoint(OLD_RUN), 2, speed=Speed("fp32"), device="cpu")
    images = as_uint8_hwc(sampler.samples([0, 1], SamplerSettings("ddim", 10))).numpy().astype(int)
    expected = np.load(FIXTURES / "samples-276a735-ddim10-seeds-0-1.npz")["images"].astype(int)
    # Equal where the CPU's float kernels are those that wrote the file; elsewhere within rounding.
    assert images.shape == expected.shape == (2, 32, 32, 3)
    assert np.abs(images - expected).max() <= 2 and (images != expected).mean() < 0.01


def test_it_resumes_and_is_saved_again_in_the_new_format(tmp_path):
    payload = read_checkpoint(OLD_RUN)
    recipe = load_checkpoint(OLD_RUN)[2]
    state = build_state(recipe, torch.device("cpu"), unet=unet_config_of(payload))
    restore_state(payload, state)
    x0 = to_model_input(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8))
    for _ in range(2):
        loss, _ = train_step(state, state.model, x0, recipe)
        assert torch.isfinite(loss)
    assert state.step == 12
    save_checkpoint(tmp_path / "checkpoint-000000012", state, recipe, run={"storage": "elsewhere"})
    again = read_checkpoint(tmp_path)
    assert "config" not in again and again["recipe"] == recipe.to_dict() and again["run"] == {"storage": "elsewhere"}
    assert load_checkpoint(tmp_path)[2] == recipe and again["step"] == 12


def test_it_exports_to_diffusers(tmp_path):
    proc = run_main("jobs/export.py", "--checkpoint", OLD_RUN, "--out", tmp_path / "exported")
    assert proc.returncode == 0, proc.stderr
    assert is_diffusers_folder(tmp_path / "exported")
    exported, original = read_checkpoint(tmp_path / "exported"), read_checkpoint(OLD_RUN)
    for name, tensor in original["ema"].items():
        torch.testing.assert_close(exported["ema"][name], tensor, rtol=0, atol=0)


def test_loading_needs_no_run_settings(tmp_path):
    folder = Path(tiny_checkpoint(tmp_path / "ckpt"))
    payload = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert "run" not in payload and set(payload["recipe"]) == set(Recipe.__dataclass_fields__)
    assert load_checkpoint(folder)[2] == RECIPES["tiny"]


def test_the_core_reads_local_files_and_names_the_platform_for_uris():
    with pytest.raises(Exception, match="diffusion.platform.checkpoint_uris.read_checkpoint"):
        read_checkpoint("s3://bucket/runs/tiny")


# ---------------------------------------------------------------------------- eta in [0, 1] everywhere


def test_sampler_settings_refuse_an_eta_beyond_one_naming_the_range():
    with pytest.raises(OptionError, match=r"^eta must be in \[0, 1\], got 1.5$"):
        SamplerSettings("ddim", 50, 1.5)
    with pytest.raises(OptionError, match="eta must be in"):
        SamplerSettings(eta=float("nan"))


@pytest.mark.parametrize("script", ["jobs/generate.py", "jobs/sample.py", "jobs/evaluate.py"])
def test_every_sampling_command_refuses_eta_beyond_one_in_one_line(script, tmp_path):
    extra = ["--data", tmp_path] if script == "jobs/evaluate.py" else []
    proc = run_main(script, "--checkpoint", OLD_RUN, "--steps", "50", "--eta", "1.5", "--out", tmp_path / "o", *extra)
    assert proc.returncode == 2 and proc.stderr == "error: eta must be in [0, 1], got 1.5\n", proc.stderr
