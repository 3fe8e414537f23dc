"""Speed without changing what is computed: the UNet for sampling in bf16 and channels_last,
optionally compiled -- in "reduce-overhead" mode on CUDA, so that at the fixed batch shape of
`fixed_batch` a model call replays one CUDA graph instead of launching every kernel from
Python (Inductor also fuses each GroupNorm with the SiLU after it) -- and, for training
sets that fit, the data set kept on the GPU (`DeviceData`).

Training's own switches (bf16 autocast, channels_last, fused Adam, foreach EMA, compile)
live in `diffusion.training`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .samplers import Model

PRECISIONS = ("auto", "fp32", "bf16")


def use_bf16(precision: str, device: torch.device) -> bool:
    """`auto`: bf16 on CUDA (tensor cores), fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


@dataclass(frozen=True)
class SamplerSpeed:
    """How a sampler evaluates the UNet. It changes the arithmetic, not the method: bf16 images
    differ slightly from fp32 ones, and each is reproducible per seed at one batch shape."""

    precision: str = "auto"  # auto (bf16 on CUDA), fp32 or bf16
    compile: bool = False  # torch.compile; CUDA graphs on CUDA


def sampling_model(model: nn.Module, speed: SamplerSpeed = SamplerSpeed()) -> Model:
    """`model` (in eval mode, on its device) as a sampler's model(x_t, t) -> eps in float32.

    On CUDA the weights and inputs are channels_last; with bf16 the network runs under bf16
    autocast while the sampler's update arithmetic stays float32. With `compile`, the first
    call at a new batch shape compiles (about a minute); sampling loops call at one shape."""
    model.eval()
    device = next(model.parameters()).device
    bf16, channels_last, compile = use_bf16(speed.precision, device), device.type == "cuda", speed.compile
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if compile:
        net = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)

    def call(x: Tensor, t: Tensor) -> Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if compile:
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs are no longer read
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            eps = net(x, t)
        # A CUDA graph's output buffer is overwritten by its next replay: hand out a copy.
        return eps.clone() if compile and eps.dtype == torch.float32 else eps.float()

    return call


def fits_on_device(dataset_bytes: int, device: torch.device, fraction: float = 0.1) -> bool:
    """Whether a uint8 data set of this size is worth keeping on a CUDA device: at most
    `fraction` of its memory (CIFAR-10's 150 MB, or STL-10's 3.1 GB on an 80 GB GPU)."""
    if device.type != "cuda":
        return False
    return dataset_bytes <= fraction * torch.cuda.get_device_properties(device).total_memory


class DeviceData:
    """A training set held where training runs, as uint8 (N, H, W, C). Each epoch is a fresh
    permutation drawn on the device (from its RNG, which checkpoints save), cut into full
    batches: no host-to-device copy and no host sync per step."""

    def __init__(self, images: Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"DeviceData holds uint8 (N, H, W, C) images, got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def epoch(self, batch_size: int) -> Iterator[Tensor]:
        if batch_size > len(self.images):
            raise ValueError(f"batch size {batch_size} exceeds the {len(self.images)} images of this worker")
        order = torch.randperm(len(self.images), device=self.images.device)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield self.images[order[start : start + batch_size]]
