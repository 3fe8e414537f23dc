"""Speed of the diffusion core without Ray: UNet forward and forward+backward (img/s) and
DDIM sampler steps, for the cifar10 and stl10 configs, with MFU from a FLOP count.

    python bench/core.py --smoke                                  # tiny sizes, CPU, seconds
    python bench/core.py --device cuda --precision bf16 --channels-last     # GPU
    python bench/core.py --device cuda --precision bf16 --channels-last --compile --json bench/results/core-h100.json

MFU = achieved FLOP/s / peak FLOP/s, with FLOPs counted by torch.utils.flop_counter on one
forward (a training step counts 3x the forward). Peak defaults to the dense bf16 peak of
the GPU when known (--peak-tflops overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion import ddim_sample
from diffusion.config import Recipe, Speed
from diffusion.platform.cli import add_options
from diffusion.speed import use_bf16
from diffusion.training import autocast, build_state, train_step

# Dense bf16 tensor-core peaks, TFLOP/s.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# The CPU flags that decide how fast a convolution runs (x86 SIMD and AMX; Arm NEON/SVE).
VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "asimd", "sve")


def machine(device: str = "cpu") -> dict:
    """What a benchmark ran on: the CPU model and its vector extensions (/proc/cpuinfo), the
    kernels torch picked for it (cpu_capability), cores and torch threads, and the GPU if any.
    The same network runs several times faster on one x86 CPU than on another of the same core
    count, so CPU timings mean little without these."""
    info = {"cpu": platform.processor() or platform.machine(), "vector_extensions": []}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                info["cpu"] = value
            elif key in ("flags", "Features"):
                info["vector_extensions"] = [f for f in VECTOR_FLAGS if f in value.split()]
    except OSError:  # not Linux: the model from platform alone
        pass
    info |= {
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
    }
    return info


def describe(info: dict) -> str:
    """One line for a table's header: the GPU, or the CPU with its extensions and threads."""
    if info["gpu"]:
        return info["gpu"]
    extensions = ", ".join(info["vector_extensions"]) or "no AVX"
    return f"{info['cpu']} ({extensions}; torch {info['torch_cpu_capability']}), {info['torch_threads']} threads"


def forward_flops(model, size: int, device) -> int:
    x = torch.randn(1, model.config.in_channels, size, size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    return counter.get_total_flops()


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, iters: int, warmup: int, device: str) -> float:
    """Median seconds per call over `iters` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_config(name: str, batch: int, args) -> list[dict]:
    device = torch.device(args.device)
    config = Recipe(model=name)
    state = build_state(
        config, device, channels_last=args.channels_last
    )  # the library's model, Adam and EMA, as training uses them
    model, size = state.model, state.model.config.image_size
    flops = forward_flops(model, size, device)
    net = torch.compile(model) if args.compile else model
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).to(memory_format=memory_format)
    t = torch.randint(0, 1000, (batch,), device=device)

    def forward():
        with torch.no_grad(), autocast(args.bf16, device):
            net(x, t)

    def step():
        train_step(state, net, x, config, args.bf16)  # L_simple, backward, clip, Adam, EMA

    def sample():
        with torch.no_grad(), autocast(args.bf16, device):
            ddim_sample(net, state.schedule.betas, x, steps=args.sampler_steps)

    rows = []
    for task, fn, flop_mult, calls in [
        ("forward", forward, 1, 1),
        ("train_step", step, 3, 1),
        (f"ddim{args.sampler_steps}", sample, 1, args.sampler_steps),
    ]:
        model.train(task == "train_step")
        seconds = timed(fn, args.iters, args.warmup, args.device)
        achieved = flops * flop_mult * calls * batch / seconds
        peak = peak_tflops(args.device, args.peak_tflops)
        rows.append(
            {
                "config": name,
                "task": task,
                "batch": batch,
                "seconds": seconds,
                "img_per_s": batch / seconds,
                "gflop_per_img_forward": flops / 1e9,
                "tflops": achieved / 1e12,
                "mfu": achieved / (peak * 1e12) if peak else None,
            }
        )
        print(
            f"{name:8s} {task:10s} batch {batch:4d}: {batch / seconds:9.1f} img/s  "
            f"{achieved / 1e12:7.2f} TFLOP/s" + (f"  MFU {rows[-1]['mfu']:.1%}" if peak else ""),
            flush=True,
        )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["cifar10", "stl10"], help="UNet configs to time")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128], help="batch sizes to time")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    add_options(p.add_argument_group("the UNet"), Speed)
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--sampler-steps", type=int, default=10, help="DDIM steps in the sampling timing")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up iterations")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: known GPUs)")
    p.add_argument("--smoke", action="store_true", help="tiny config, batch 2, 1 iteration: a CPU check that it runs")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    args.bf16 = use_bf16(args.precision, torch.device(args.device))
    if args.smoke:
        args.configs, args.batch_sizes, args.iters, args.warmup, args.sampler_steps = ["tiny"], [2], 1, 0, 2

    rows = [row for name in args.configs for batch in args.batch_sizes for row in bench_config(name, batch, args)]
    if args.json:
        meta = {
            "machine": machine(args.device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "bf16": args.bf16,
            "channels_last": args.channels_last,
            "compile": args.compile,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
