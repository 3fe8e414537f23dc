"""diffusion.speed: the sampling model in other precisions and compiled computes what the
plain model does, and DeviceData serves each image once per epoch in full batches."""

import pytest
import torch

from diffusion import build_unet, make_betas
from diffusion.config import SamplerSettings, Speed
from diffusion.pipeline import Pipeline
from diffusion.speed import sampling_model, use_bf16
from diffusion.training import DeviceData, fits_on_device
from diffusion.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = build_unet("tiny").eval()
    for p in model.parameters():  # away from the zero-initialised last layers
        p.data.normal_(0, 0.02)
    return model


def test_precision_choice_and_errors():
    cpu = torch.device("cpu")
    assert not use_bf16("auto", cpu) and use_bf16("bf16", cpu) and not use_bf16("fp32", cpu)
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        use_bf16("fp16", cpu)
    assert not fits_on_device(1, cpu)  # only CUDA memory is worth the copy


def test_fp32_is_the_model_and_bf16_is_close(unet):
    x, t = torch.randn(4, 3, 32, 32), torch.randint(0, 1000, (4,))
    with torch.no_grad():
        reference = unet(x, t)
        assert torch.equal(sampling_model(unet, Speed("fp32"))(x, t), reference)
        bf16 = sampling_model(unet, Speed("bf16"))(x, t)
    assert bf16.dtype == torch.float32  # the sampler's arithmetic stays float32
    assert 0 < (bf16 - reference).norm() / reference.norm() < 2e-2


def test_a_compiled_sampler_gives_the_eager_samples():
    """torch.compile (CUDA graphs on a GPU) changes the kernels, not the samples. The UNet is one
    level of the network's blocks (ResBlocks, attention, time embedding; no resampling), which
    Inductor compiles in a third of the tiny UNet's time on a CPU."""
    torch.manual_seed(0)
    one_level = UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1,), attn_resolutions=(8,), num_res_blocks=1)
    unet = UNet(one_level).eval()
    for p in unet.parameters():  # away from the zero-initialised last layers
        p.data.normal_(0, 0.02)
    betas, settings = make_betas("linear"), SamplerSettings("ddim", 3)
    eager = Pipeline(unet, betas, 2).samples([5, 6, 7], settings)
    compiled = Pipeline(unet, betas, 2, Speed("fp32", compile=True)).samples([5, 6, 7], settings)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


def test_device_data_serves_every_image_once_per_epoch_in_full_batches():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 2, 2, 3).contiguous()
    data = DeviceData(images)
    torch.manual_seed(0)
    first = [b[:, 0, 0, 0].tolist() for b, labels in data.epoch(3) if labels is None]
    second = [b[:, 0, 0, 0].tolist() for b, _ in data.epoch(3)]
    assert [len(b) for b in first] == [3, 3, 3]  # full batches; the 10th image waits for another epoch
    seen = sum(first, [])
    assert len(set(seen)) == 9 and set(seen) <= set(range(10))
    assert first != second  # a new order every epoch
    torch.manual_seed(0)
    assert [b[:, 0, 0, 0].tolist() for b, _ in data.epoch(3)] == first  # from torch's generator
    # Labels travel with their images (image i has label 100 + i).
    labelled = DeviceData(images, torch.arange(100, 110))
    assert all((labels == 100 + b[:, 0, 0, 0].long()).all() for b, labels in labelled.epoch(3))
    with pytest.raises(ValueError, match="batch size 11 exceeds the 10 images"):
        next(data.epoch(11))
    with pytest.raises(ValueError, match="uint8"):
        DeviceData(images.float())
    with pytest.raises(ValueError, match="one label per image"):
        DeviceData(images, torch.arange(9))
