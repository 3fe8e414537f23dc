"""Speed without changing what is computed: the UNet for sampling in bf16 and channels_last,
optionally compiled -- in "reduce-overhead" mode on CUDA, so that at the fixed batch shape of
`fixed_batch` a model call replays one CUDA graph instead of launching every kernel from
Python (Inductor also fuses each GroupNorm with the SiLU after it).

On CUDA, training and sampling also turn on cuDNN autotuning and TF32 (`fast_cuda_kernels`).
Training's own switches (bf16 autocast, channels_last, fused Adam, foreach EMA, compile, the
training set kept on the GPU) live in `diffusion.training`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import PRECISIONS, Speed
from .samplers import Model


def default_device() -> torch.device:
    """This process's GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fast_cuda_kernels() -> None:
    """cuDNN's autotuner for the fixed shapes of training and sampling, and TF32 for the float32
    matmuls and convolutions that remain under bf16 autocast (or all of them with fp32)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware: Intel AMX (`amx_bf16`) or AVX-512
    BF16 (`avx512_bf16`: Cooper Lake, Sapphire Rapids, AMD Zen 4) among the flags of
    /proc/cpuinfo; False where that cannot be read."""
    try:
        return any(
            line.startswith("flags") and {"amx_bf16", "avx512_bf16"} & set(line.split())
            for line in Path("/proc/cpuinfo").read_text().splitlines()
        )
    except OSError:
        return False


def use_bf16(precision: str, device: torch.device, training: bool = False) -> bool:
    """`auto`: bf16 autocast where it was measured faster (bench/cpu_training.py): on CUDA (tensor
    cores), and for training on a CPU with native bf16 (AMX: 1.6-3.6x fp32's images per second;
    AVX-512 BF16 on an AMD EPYC: 2.1x at 6.5M); fp32 elsewhere, and for sampling on every CPU (its
    samples then alike on every CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (training and device.type == "cpu" and cpu_has_native_bf16())


def sampling_model(model: nn.Module, speed: Speed = Speed()) -> Model:
    """`model` (in eval mode, on its device) as a sampler's model(x_t, t) -> eps in float32
    (model(x_t, t, y) for a class-conditional model).

    On CUDA the weights and inputs are channels_last; with bf16 the network runs under bf16
    autocast while the sampler's update arithmetic stays float32. With `compile`, the first
    call at a new batch shape compiles (about a minute); sampling loops call at one shape."""
    model.eval()
    device = next(model.parameters()).device
    bf16, channels_last, compile = use_bf16(speed.precision, device), device.type == "cuda", speed.compile
    if device.type == "cuda":
        fast_cuda_kernels()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if compile:
        net = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)

    def call(x: Tensor, t: Tensor, *labels: Tensor) -> Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if compile:
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs are no longer read
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            eps = net(x, t, *labels)
        # A CUDA graph's output buffer is overwritten by its next replay: hand out a copy.
        return eps.clone() if compile and eps.dtype == torch.float32 else eps.float()

    return call
