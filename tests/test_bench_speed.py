"""bench/speed.py: the smoke run writes both sides' rows, the diffusers UNet2DModel is our network
(parameters, FLOPs, and outputs with our weights), and the diffusers sampling loops and training
noise do the same arithmetic as ours, so that the benchmark compares equal work."""

import json
import sys

import pytest
import torch

from diffusion import UNET_CONFIGS, build_unet, ddim_sample, ddpm_sample, make_betas, timesteps
from diffusion.config import Recipe
from diffusion.schedule import NoiseSchedule
from helpers import ROOT, assert_machine_recorded, run_main

pytest.importorskip("diffusers", reason="bench/speed.py compares against diffusers: pip install 'ray-diffusion[bench]'")

sys.path.insert(0, str(ROOT / "bench"))  # bench/ is a folder of scripts: import one to test its parts
import speed  # noqa: E402


def test_smoke_run_writes_json_and_markdown(tmp_path):
    proc = run_main("bench/speed.py", "--smoke", "--out", tmp_path, "--tag", "smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "speed-smoke.json").read_text())
    assert data["meta"]["diffusers"] and data["meta"]["torch"] and data["meta"]["num_timesteps"] == 10
    assert_machine_recorded(data["meta"]["machine"])
    rows = data["rows"]
    assert [(r["config"], r["task"], r["batch"]) for r in rows] == [
        ("tiny", "train", 2),
        ("tiny", "ddim2", 2),
        ("tiny", "ddpm10", 2),
    ]
    for r in rows:
        for side in ("ours", "diffusers"):
            assert r[f"{side}_img_per_s"] > 0 and len(r[f"{side}_s_per_call"]) == 1
            assert r[f"{side}_gflop_per_img_forward"] > 0.5  # the tiny UNet: 0.58 GFLOP
        assert r["ratio"] == pytest.approx(r["ours_img_per_s"] / r["diffusers_img_per_s"])
    table = (tmp_path / "speed-smoke.md").read_text()
    assert "| config | task | batch | ours img/s | diffusers img/s | ratio | MFU ours | MFU diffusers |" in table
    assert all(f"| tiny | {task} | 2 |" in table for task in ("train", "ddim2", "ddpm10"))
    assert data["meta"]["machine"]["cpu"] in table


def test_runs_report_the_ratio_spread_and_the_profile_ranks_both_steps(tmp_path):
    proc = run_main(
        "bench/speed.py", "--smoke", "--tasks", "train", "--runs", "2", "--profile", "--out", tmp_path, "--tag", "smoke"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "speed-smoke.json").read_text())["rows"]
    assert [(r["run"], r["task"]) for r in rows] == [(1, "train"), (2, "train")]
    table = (tmp_path / "speed-smoke.md").read_text()
    spread = f"| tiny | train | 2 | {rows[0]['ratio']:.3f}, {rows[1]['ratio']:.3f} |"
    assert "The ratio over the runs:" in table and spread in table, table

    (profile,) = json.loads((tmp_path / "profile-smoke.json").read_text())["profiles"]
    assert (profile["config"], profile["batch"]) == ("tiny", 2)
    for side in ("ours", "diffusers"):
        ops = profile["ops_ms"][side]
        assert ops["aten::convolution_backward"] > 0 and ops["aten::mkldnn_convolution"] > 0
        assert 0 < speed.shared_ms(ops) < sum(ops.values())
    ours = profile["ops_ms"]["ours"]
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ours  # the fused kernel, not the math one
    assert "aten::_fused_adam_" in ours and "aten::bmm" not in ours  # fused Adam; no per-row time embedding
    md = (tmp_path / "profile-smoke.md").read_text()
    assert "## tiny, batch 2" in md and "| 1 | `aten::convolution_backward` |" in md
    assert "would lead diffusers by at most" in md and "Largest differences:" in md


def test_cpu_and_gpu_defaults():
    cpu = speed.parse_args(["--device", "cpu"])
    assert (cpu.configs, cpu.tasks, cpu.train_batches, cpu.sample_batches) == (
        ["cifar10"],
        ["train", "ddim10"],
        [8, 32],
        [8, 32],
    )
    assert (cpu.runs, cpu.rounds, cpu.bf16, cpu.channels_last) == (3, 3, False, False)
    with pytest.raises(SystemExit):
        speed.parse_args(["--device", "cuda", "--profile"])  # CPU only: GPU kernels are not attributed to ops
    gpu = speed.parse_args(["--device", "cuda", "--rounds", "2"])
    assert (gpu.configs, gpu.train_batches, gpu.runs, gpu.rounds, gpu.bf16) == (["cifar10", "stl10"], None, 1, 2, True)


def test_a_run_cut_short_keeps_the_cells_it_finished(tmp_path, monkeypatch):
    """A GPU lease ends when it ends: every cell is in the JSON and table as soon as it is measured."""
    measured = []

    def alternate_until_the_time_limit(*args, **kwargs):
        if measured:
            raise KeyboardInterrupt  # the lease's limit, during the second cell
        measured.append(speed_alternate(*args, **kwargs))
        return measured[-1]

    speed_alternate = speed.alternate
    monkeypatch.setattr(speed, "alternate", alternate_until_the_time_limit)
    with pytest.raises(KeyboardInterrupt):
        speed.main(["--smoke", "--out", str(tmp_path), "--tag", "cut"])
    assert [row["task"] for row in json.loads((tmp_path / "speed-cut.json").read_text())["rows"]] == ["train"]
    assert "| tiny | train | 2 |" in (tmp_path / "speed-cut.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed-cut.json", "speed-cut.md"]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["cifar10", "stl10"])
def test_diffusers_unet_has_our_size(name):
    config = UNET_CONFIGS[name]
    with torch.device("meta"):  # shapes are all that counting needs
        ours, theirs = build_unet(name), speed.build_hf_unet(config)
    assert n_params(ours) == n_params(theirs) == 35_746_307
    flops_ours, flops_theirs = speed.count_flops(ours, config.image_size), speed.count_flops(theirs, config.image_size)
    assert flops_ours > 1e10
    assert abs(flops_theirs - flops_ours) <= 0.02 * flops_ours, (flops_ours, flops_theirs)


class AsUNet:
    """An eps model (x_t, t[B]) -> eps called as diffusers' pipelines call a UNet2DModel: (x, t[]) -> .sample."""

    def __init__(self, eps_model):
        self.eps_model = eps_model

    def __call__(self, x, t):
        assert t.dim() == 0
        return type("Out", (), {"sample": self.eps_model(x, t.expand(x.shape[0]))})


def test_diffusers_samplers_do_our_arithmetic(oracle):
    config = Recipe()
    betas = make_betas("linear", config.num_timesteps, config.beta_start, config.beta_end)
    ddim, ddpm = speed.hf_scheduler("ddim", config), speed.hf_scheduler("ddpm", config)
    torch.testing.assert_close(ddim.betas.double(), betas, rtol=1e-6, atol=0)  # diffusers keeps float32
    for steps in (10, 50, 100):
        ddim.set_timesteps(steps)
        assert ddim.timesteps.tolist() == timesteps(1000, steps).flip(0).tolist()
        speed.check_same_timesteps(ddim, 1000, steps)

    eps_model = oracle(betas, mu=0.3, s=0.5)
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = ddim_sample(eps_model, betas, x_T, steps=10)
    theirs = speed.hf_sample(AsUNet(eps_model), ddim, x_T, 10)
    assert (ours - 0.3).abs().mean() < 1.0  # the oracle's samples, not noise
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    # DDPM-1000 draws the same noise in the same order: the same images from the same generator seed.
    ours = ddpm_sample(eps_model, betas, x_T, generator=torch.Generator().manual_seed(1))
    theirs = speed.hf_sample(AsUNet(eps_model), ddpm, x_T, 1000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_diffusers_training_noise_is_our_forward_process():
    config = Recipe()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1, torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = NoiseSchedule.from_name("linear", config.num_timesteps).q_sample(x0, t, noise)
    theirs = speed.hf_scheduler("ddpm", config).add_noise(x0, noise, t)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)  # diffusers: float32 abar (1 - abar at t=1 is 3e-4)
