import pytest
import torch

from diffusion import UNetConfig, build_unet
from diffusion.unet import timestep_embedding


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def perturbed(name, seed=0):
    """A UNet whose zero-initialised layers are made non-zero, so its output is not trivially 0."""
    torch.manual_seed(seed)
    model = build_unet(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def test_parameter_counts():
    assert n_params(build_unet("cifar10")) == pytest.approx(35.7e6, rel=0.01)
    assert n_params(build_unet("cifar10")) == 35_746_307  # the reference implementation's count
    assert n_params(build_unet("stl10")) == 35_746_307  # same network, attention moved to 24x24
    assert n_params(build_unet("tiny")) < 1e6


@pytest.mark.parametrize("name, size", [("tiny", 32), ("cifar10", 32), ("stl10", 96)])
def test_forward_shapes(name, size):
    model = build_unet(name).eval()
    assert model.config.image_size == size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and out.dtype == torch.float32


def test_new_model_predicts_zero_noise_as_the_reference_initialises():
    with torch.no_grad():
        out = build_unet("tiny")(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    assert torch.all(out == 0)


@pytest.mark.parametrize("name", ["tiny", "cifar10"])
def test_channels_last_and_bf16_autocast_match_fp32(name):
    model = perturbed(name)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 700])
    with torch.no_grad():
        ref = model(x, t)
        cl_model = perturbed(name).to(memory_format=torch.channels_last)
        cl = cl_model(x.to(memory_format=torch.channels_last), t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = cl_model(x.to(memory_format=torch.channels_last), t)
    assert ref.abs().mean() > 0.05
    assert torch.allclose(cl, ref, rtol=1e-4, atol=1e-4)
    rel_err = (bf16.float() - ref).norm() / ref.norm()
    assert rel_err < 0.05


def test_backward_reaches_every_parameter():
    model = perturbed("tiny").train()
    loss = model(torch.randn(2, 3, 32, 32), torch.tensor([3, 400])).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 1, 999]), 128)
    assert emb.shape == (3, 128)
    assert torch.allclose(emb[0], torch.cat([torch.zeros(64), torch.ones(64)]))
    assert not torch.allclose(emb[1], emb[2])


def test_build_unet_from_config_dict_and_overrides():
    assert build_unet(UNetConfig(ch=32, ch_mult=(1,), attn_resolutions=())).config.ch == 32
    assert build_unet({"ch": 64, "ch_mult": [1, 2], "attn_resolutions": [16]}).config.ch_mult == (1, 2)
    assert build_unet("cifar10", dropout=0.0).config.dropout == 0.0


@pytest.mark.parametrize(
    "arg, match",
    [
        (
            "imagenet",
            "unknown UNet config 'imagenet': choose one of cifar10, stl10, cifar10-cpu, ddpm-256, tiny, digits",
        ),
        ({"ch": 100}, "ch must be a multiple of 32"),
        (
            {"image_size": 96, "attn_resolutions": (16,)},
            r"attn_resolutions \[16\] do not occur; the resolutions are \[96, 48, 24, 12\]",
        ),
        ({"image_size": 36, "ch_mult": (1, 2, 2, 2)}, "image_size 36 cannot be halved 3 times"),
        ({"channels": 3}, r"unknown UNet config fields \['channels'\]"),
    ],
)
def test_bad_configs_are_named(arg, match):
    with pytest.raises(ValueError, match=match):
        build_unet(arg)
