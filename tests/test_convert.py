"""The published DDPM weights in and out: a diffusers UNet2DModel / DDPMPipeline folder built
from google/ddpm-cifar10-32's published config, the same weights in the DDPM reference's layout
(pesser/pytorch_diffusion), and our checkpoints exported to diffusers and read back. No network:
the models are built here with random weights."""

import json
import logging
import re

import pytest
import torch

from diffusion import load_checkpoint, read_checkpoint
from diffusion.checkpoint import CheckpointError, model_from, sampling_defaults
from diffusion.config import SamplerSettings
from diffusion.convert import diffusers_unet_kwargs
from diffusion.pipeline import Pipeline
from diffusion.samplers import ddim_sample, make_generators, randn
from diffusion.unet import UNET_CONFIGS, UNetConfig, build_unet
from helpers import cli, tiny_checkpoint

diffusers = pytest.importorskip(
    "diffusers", reason="the conversion tests build diffusers models: pip install diffusers"
)

# google/ddpm-cifar10-32: config.json and scheduler_config.json as published on the hub.
GOOGLE_UNET = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
GOOGLE_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.0.4",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
}
MODEL_INDEX = {
    "_class_name": "DDPMPipeline",
    "scheduler": ["diffusers", "DDPMScheduler"],
    "unet": ["diffusers", "UNet2DModel"],
}


@pytest.fixture(scope="module")
def google_unet():
    """A UNet2DModel of google/ddpm-cifar10-32's config with random weights (fixed seed): its
    init, plus noise on the layers it initialises to constants, so every tensor matters."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**{k: v for k, v in GOOGLE_UNET.items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 417, 999])
    with torch.no_grad():
        out = model(x, t)
    return out.sample if hasattr(out, "sample") else out


def test_a_diffusers_unet_folder_and_pipeline_folder_load_as_checkpoints(google_unet, tmp_path):
    expected = outputs(google_unet)
    google_unet.save_pretrained(tmp_path / "unet-only")  # a UNet2DModel folder: DDPM's schedule
    pipeline = tmp_path / "pipeline"  # a DDPMPipeline folder: model_index.json, unet/, scheduler/
    google_unet.save_pretrained(pipeline / "unet", safe_serialization=False)  # .bin weights
    write_json(pipeline / "scheduler" / "scheduler_config.json", GOOGLE_SCHEDULER)
    write_json(pipeline / "model_index.json", MODEL_INDEX)
    for folder in (tmp_path / "unet-only", pipeline):
        model, ema_model, config = load_checkpoint(folder)
        torch.testing.assert_close(outputs(ema_model), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(outputs(model), expected, atol=1e-5, rtol=0)
        assert model.config == UNET_CONFIGS["cifar10"].__class__(
            **{**UNET_CONFIGS["cifar10"].to_dict(), "dropout": 0.0}
        )
        payload = read_checkpoint(folder)
        torch.testing.assert_close(payload["betas"], torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
        assert sampling_defaults(payload) == {"variance": "beta", "clip": True}  # fixed_large, clip_sample: true
        assert config.model == "cifar10" and config.num_timesteps == 1000


def test_the_hubs_flat_layout_with_legacy_attention_names_loads(google_unet, tmp_path):
    """google/ddpm-cifar10-32 keeps config.json, scheduler_config.json and the weights in one
    folder, and its weights use diffusers' attention names of 2022 (query/key/value/proj_attn)."""
    from diffusion.convert import read_safetensors

    google_unet.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    legacy = {
        re.sub(r"\.to_q\.", ".query.", re.sub(r"\.to_k\.", ".key.", re.sub(r"\.to_v\.", ".value.", k))).replace(
            ".to_out.0.", ".proj_attn."
        ): v
        for k, v in read_safetensors(weights).items()
    }
    weights.unlink()
    torch.save(legacy, tmp_path / "diffusion_pytorch_model.bin")
    write_json(tmp_path / "scheduler_config.json", {**GOOGLE_SCHEDULER, "variance_type": "fixed_small"})
    write_json(tmp_path / "model_index.json", MODEL_INDEX)
    payload = read_checkpoint(tmp_path)
    torch.testing.assert_close(outputs(model_from(payload)), outputs(google_unet), atol=1e-5, rtol=0)
    assert sampling_defaults(payload)["variance"] == "posterior"


def reference_layout(diffusers_state: dict) -> dict:
    """The DDPM reference's (pesser/pytorch_diffusion `Model`) state dict for diffusers' tensors,
    written from the two layouts: 1x1-conv attention, the up path numbered from the top."""
    levels = 4
    rules = [
        (r"^time_embedding\.linear_1\.", "temb.dense.0."),
        (r"^time_embedding\.linear_2\.", "temb.dense.1."),
        (r"^conv_norm_out\.", "norm_out."),
        (r"^mid_block\.resnets\.0\.", "mid.block_1."),
        (r"^mid_block\.resnets\.1\.", "mid.block_2."),
        (r"^mid_block\.attentions\.0\.", "mid.attn_1."),
        (r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
        (r"^down_blocks\.(\d+)\.attentions\.", r"down.\1.attn."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
        (r"^up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m[1])}.block."),
        (r"^up_blocks\.(\d+)\.attentions\.", lambda m: f"up.{levels - 1 - int(m[1])}.attn."),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample."),
        (r"\.time_emb_proj\.", ".temb_proj."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.group_norm\.", ".norm."),
        (r"\.to_q\.", ".q."),
        (r"\.to_k\.", ".k."),
        (r"\.to_v\.", ".v."),
        (r"\.to_out\.0\.", ".proj_out."),
    ]
    out = {}
    for key, value in diffusers_state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        conv = re.search(r"\.(q|k|v|proj_out)\.weight$", key)
        out[key] = value[:, :, None, None] if conv else value  # the reference's attention is 1x1 convs
    return out


def test_a_ddpm_reference_state_dict_loads_as_a_checkpoint(google_unet, tmp_path):
    state = reference_layout(google_unet.state_dict())
    assert len(state) == 328 and "down.1.attn.0.q.weight" in state and "up.1.attn.2.proj_out.weight" in state
    torch.save(state, tmp_path / "ema_cifar10.ckpt")
    model, _, config = load_checkpoint(tmp_path / "ema_cifar10.ckpt")
    torch.testing.assert_close(outputs(model), outputs(google_unet), atol=1e-5, rtol=0)
    assert model.config.image_size == 32 and model.config.attn_resolutions == (16,) and config.model == "cifar10"
    assert sampling_defaults(read_checkpoint(tmp_path / "ema_cifar10.ckpt")) == {"variance": "beta", "clip": True}


def no_warnings_loading(folder):
    """DDPMPipeline.from_pretrained(folder) and the WARNING records diffusers logged meanwhile."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers.utils.logging.add_handler(handler)
    try:
        pipeline = diffusers.DDPMPipeline.from_pretrained(folder, low_cpu_mem_usage=False)  # no accelerate here
    finally:
        diffusers.utils.logging.remove_handler(handler)
    return pipeline, [r.getMessage() for r in records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("source", ["trained-tiny", pytest.param("cifar10", marks=pytest.mark.slow)])
def test_export_gives_diffusers_our_network_and_sampler_and_reads_back(source, tmp_path):
    if source == "trained-tiny":
        checkpoint = tiny_checkpoint(tmp_path / "ckpt")  # perturbed EMA weights
    else:  # the cifar10 UNet with every weight drawn (our init zeroes output layers)
        from diffusion.checkpoint import save_checkpoint
        from diffusion.config import RECIPES
        from diffusion.training import build_state

        state = build_state(RECIPES["cifar10"], torch.device("cpu"))
        with torch.no_grad():
            for p in state.ema.ema_model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        checkpoint = str(save_checkpoint(tmp_path / "ckpt", state, RECIPES["cifar10"]).parent)
    out = tmp_path / "exported"
    proc = cli("jobs/export.py", "--checkpoint", checkpoint, "--out", out)
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr
    ours = model_from(read_checkpoint(checkpoint))
    pipeline, warnings = no_warnings_loading(out)
    assert warnings == []
    size = ours.config.image_size
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, size, size, generator=g), torch.tensor([5, 900])
    with torch.no_grad():
        torch.testing.assert_close(pipeline.unet.eval()(x, t).sample, ours(x, t), atol=1e-5, rtol=0)

    # DDIM from the export's scheduler config, from our x_T: our DDIM images.
    scheduler = diffusers.DDIMScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(10)
    x_T = randn((2, 3, size, size), make_generators([3, 4]))
    x = x_T
    with torch.no_grad():
        for step in scheduler.timesteps:
            x = scheduler.step(pipeline.unet(x, step).sample, step, x, eta=0.0).prev_sample
        expected = ddim_sample(ours, read_checkpoint(checkpoint)["betas"], x_T, steps=10)
    # Untrained weights leave the images far outside [-1, 1]: 1e-4 of their scale.
    torch.testing.assert_close(x, expected, atol=1e-4 * max(1.0, expected.abs().max().item()), rtol=0)

    back = read_checkpoint(out)  # export -> import: the same weights
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(back["ema"][key], value, atol=0, rtol=0)
    assert sampling_defaults(back) == {"variance": "posterior", "clip": False}  # ours: the papers' equations


def test_a_class_conditional_model_exports_with_its_null_class_samples_guided_in_diffusers_and_reads_back(tmp_path):
    """A UNet2DModel with num_class_embeds K + 1 computes our function for every class and the null
    class (1e-4); diffusers' DDIM with the guidance formula on its two halves gives our guided
    images; the class names travel in its config; float16 halves the files."""
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", conditional=True)
    out = tmp_path / "exported"
    proc = cli("jobs/export.py", "--checkpoint", checkpoint, "--out", out)
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr
    payload = read_checkpoint(checkpoint)
    ours = model_from(payload)
    pipeline, warnings = no_warnings_loading(out)
    unet = pipeline.unet.eval()
    assert warnings == [] and unet.config.num_class_embeds == 4 and unet.config._class_names == ["cat", "dog", "ship"]
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([5, 900])
    with torch.no_grad():
        for label in range(4):  # the three classes and the null class
            y = torch.full((2,), label)
            torch.testing.assert_close(unet(x, t, class_labels=y).sample, ours(x, t, y), atol=1e-4, rtol=0)

    # Guided DDIM-10 in diffusers (its scheduler, the two halves of one batched call) from our x_T.
    scale, labels = 3.0, torch.tensor([2, 0])
    scheduler = diffusers.DDIMScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(10)
    x_T = randn((2, 3, 32, 32), make_generators([3, 4]))
    x = x_T
    with torch.no_grad():
        for step in scheduler.timesteps:
            both = unet(torch.cat([x, x]), step, class_labels=torch.cat([labels, torch.full((2,), 3)])).sample
            conditional, null = both.chunk(2)
            x = scheduler.step(null + scale * (conditional - null), step, x, eta=0.0).prev_sample
    expected = Pipeline.from_checkpoint(payload, batch_size=2, device="cpu").samples(
        [3, 4], SamplerSettings("ddim", 10, guidance_scale=scale), classes=labels.tolist()
    )
    torch.testing.assert_close(x, expected, atol=1e-4 * max(1.0, expected.abs().max().item()), rtol=0)

    back = read_checkpoint(out)
    assert back["classes"] == ["cat", "dog", "ship"] and back["unet"]["num_classes"] == 3
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(back["ema"][key], value, atol=0, rtol=0)
    half = tmp_path / "half"
    assert cli("jobs/export.py", "--checkpoint", checkpoint, "--out", half, "--dtype", "float16").returncode == 0
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (half / weights).stat().st_size < 0.6 * (out / weights).stat().st_size
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(read_checkpoint(half)["ema"][key], value.half().float(), atol=0, rtol=0)


def test_bad_folders_and_files_are_named(google_unet, tmp_path):
    config_only = tmp_path / "config-only"
    write_json(config_only / "config.json", GOOGLE_UNET)
    with pytest.raises(CheckpointError, match="has a config.json but no weights"):
        read_checkpoint(config_only)

    other = tmp_path / "other"  # another architecture's weights under google's config
    diffusers.UNet2DModel(**{**diffusers_unet_kwargs(UNET_CONFIGS["tiny"])}).save_pretrained(other)
    write_json(other / "config.json", GOOGLE_UNET)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(other)
    assert "missing" in str(e.value) and "understood layouts" in str(e.value) and "wrong shape" in str(e.value)

    google_unet.save_pretrained(tmp_path / "truncated")
    weights = tmp_path / "truncated" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_checkpoint(tmp_path / "truncated")

    unknown = {"encoder.weight": torch.zeros(2)}
    torch.save(unknown, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="lacks"):
        read_checkpoint(tmp_path / "unknown.pt")


def test_export_refuses_a_used_folder_and_a_config_diffusers_cannot_express(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    proc = cli("jobs/export.py", "--checkpoint", checkpoint, "--out", tmp_path / "used")
    assert proc.returncode == 1 and "exists and is not an empty folder" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == ["keep.txt"]

    from diffusion.convert import ConversionError

    with pytest.raises(ConversionError, match="cannot express downsample_padding"):
        diffusers_unet_kwargs(UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, downsample_padding=(0, 1, 1, 0)))
    assert not list(tmp_path.glob("*.partial"))


def test_a_checkpoint_from_before_the_padding_field_keeps_its_padding(tmp_path):
    """Checkpoints written before `unet` was recorded were trained with a symmetric padding of 1."""
    path = tiny_checkpoint(tmp_path / "old")
    payload = torch.load(f"{path}/checkpoint.pt", weights_only=True)
    del payload["unet"]
    torch.save(payload, f"{path}/checkpoint.pt")
    model = model_from(read_checkpoint(path))
    assert model.config.downsample_padding == (1, 1, 1, 1)
    conv_padding_1 = torch.nn.Conv2d(32, 32, 3, stride=2, padding=1)
    conv_padding_1.load_state_dict(model.down[0].resample.conv.state_dict())
    x = torch.randn(1, 32, 32, 32)
    torch.testing.assert_close(model.down[0].resample(x), conv_padding_1(x))
    assert build_unet("cifar10").config.downsample_padding == (0, 1, 0, 1)  # the reference's, from now on


def test_the_importers_sampling_defaults_reach_the_sampler(tmp_path, google_unet):
    google_unet.save_pretrained(tmp_path / "unet")
    write_json(tmp_path / "scheduler" / "scheduler_config.json", {**GOOGLE_SCHEDULER, "num_train_timesteps": 20})
    pipeline = Pipeline.from_checkpoint(read_checkpoint(tmp_path), batch_size=2)
    assert pipeline.num_timesteps == 20
    assert pipeline.settings(SamplerSettings("ddpm")) == SamplerSettings("ddpm", variance="beta", clip=True)
    assert pipeline.settings(SamplerSettings("ddim", 10)) == SamplerSettings(
        "ddim", 10, variance="posterior", clip=False
    )
    with pytest.raises(ValueError, match="steps must be in \\[1, 20\\]"):
        pipeline.settings(SamplerSettings("ddim", 50))
