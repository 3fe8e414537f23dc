"""bench/speed.py: the smoke run writes both sides' rows, the diffusers UNet2DModel is our network
(parameters, FLOPs, and outputs with our weights), and the diffusers sampling loops and training
noise do the same arithmetic as ours, so that the benchmark compares equal work."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion import UNET_CONFIGS, UNetConfig, build_unet, ddim_sample, ddpm_sample, make_betas, timesteps
from diffusion.schedule import NoiseSchedule
from diffusion.training import TrainConfig

pytest.importorskip("diffusers", reason="bench/speed.py compares against diffusers: pip install 'ray-diffusion[bench]'")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import speed  # noqa: E402


def test_smoke_run_writes_json_and_markdown(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/speed.py", "--smoke", "--out", str(tmp_path), "--tag", "smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "speed-smoke.json").read_text())
    assert data["meta"]["diffusers"] and data["meta"]["torch"] and data["meta"]["num_timesteps"] == 10
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


def port_weights(ours, theirs) -> None:
    """Load our UNet's weights into the UNet2DModel of the same config (qkv 1x1 conv -> to_q/k/v)."""
    rename = [
        (r"^temb\.0\.", "time_embedding.linear_1."),
        (r"^temb\.2\.", "time_embedding.linear_2."),
        (r"^(down|up)\.(\d+)\.blocks\.", r"\1_blocks.\2.resnets."),
        (r"^(down|up)\.(\d+)\.attns\.", r"\1_blocks.\2.attentions."),
        (r"^down\.(\d+)\.resample\.", r"down_blocks.\1.downsamplers.0."),
        (r"^up\.(\d+)\.resample\.", r"up_blocks.\1.upsamplers.0."),
        (r"^mid\.0\.", "mid_block.resnets.0."),
        (r"^mid\.1\.", "mid_block.attentions.0."),
        (r"^mid\.2\.", "mid_block.resnets.1."),
        (r"^norm_out\.", "conv_norm_out."),
        (r"\.temb_proj\.", ".time_emb_proj."),
        (r"\.skip\.", ".conv_shortcut."),
        (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."),
        (r"(attentions\.\d+)\.proj\.", r"\1.to_out.0."),
    ]
    state = {}
    for key, value in ours.state_dict().items():
        for pattern, repl in rename:
            key = re.sub(pattern, repl, key)
        parts = zip(("to_q", "to_k", "to_v"), value.chunk(3)) if ".qkv." in key else [(None, value)]
        for name, part in parts:
            state[key.replace("qkv", name) if name else key] = (
                part.flatten(1) if part.dim() == 4 and "attentions" in key else part
            )
    theirs.load_state_dict(state, strict=True)


@pytest.mark.parametrize(
    "config",
    [
        UNET_CONFIGS["tiny"],
        # cifar10's layout (attention at the second of several levels, 2 blocks) at a CPU-test size
        UNetConfig(image_size=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), dropout=0.0),
    ],
    ids=["tiny", "cifar10-layout"],
)
def test_diffusers_unet_computes_our_function(config):
    torch.manual_seed(0)
    ours, theirs = build_unet(config).eval(), speed.build_hf_unet(config).eval()
    with torch.no_grad():
        for p in ours.parameters():  # our init zeroes the output layers: draw every weight instead
            p.copy_(torch.randn_like(p) * (1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1))
    port_weights(ours, theirs)
    x = torch.randn(3, 3, config.image_size, config.image_size)
    t = torch.tensor([0, 417, 999])
    with torch.no_grad():
        expected = ours(x, t)
        torch.testing.assert_close(theirs(x, t).sample, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


class AsUNet:
    """An eps model (x_t, t[B]) -> eps called as diffusers' pipelines call a UNet2DModel: (x, t[]) -> .sample."""

    def __init__(self, eps_model):
        self.eps_model = eps_model

    def __call__(self, x, t):
        assert t.dim() == 0
        return type("Out", (), {"sample": self.eps_model(x, t.expand(x.shape[0]))})


def test_diffusers_samplers_do_our_arithmetic(oracle):
    config = TrainConfig()
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
    config = TrainConfig()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1, torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = NoiseSchedule.from_name("linear", config.num_timesteps).q_sample(x0, t, noise)
    theirs = speed.hf_scheduler("ddpm", config).add_noise(x0, noise, t)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)  # diffusers: float32 abar (1 - abar at t=1 is 3e-4)
