"""CPU training's choices side by side: a training step of the project's UNet (L_simple, backward,
clip, Adam, EMA: `diffusion.training.train_step`) in fp32 and under bf16 autocast, contiguous and
channels_last, on 1 and 2 torch threads, at several UNet sizes, in one run. Each round times
every variant once (in reversed order every other round); the table gives each variant's median
images per second and its ratio to fp32, contiguous, on all the threads in the same round.

    python bench/cpu_training.py                                   # 1.6M and 6.5M UNets, a few minutes
    python bench/cpu_training.py --sizes 32 64 128 --json bench/results/cpu-training.json
    python bench/cpu_training.py --smoke                           # seconds: it runs

These decide `precision auto` (bf16 for training on CPUs with AMX or AVX-512 BF16, diffusion/speed.py),
channels_last (GPUs only) and the threads of a CPU training worker (diffusion/platform/resources.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch
from core import describe, machine  # bench/core.py, beside this script

from diffusion.config import Recipe
from diffusion.training import build_state, train_step
from diffusion.unet import UNET_CONFIGS, UNetConfig

# (precision, memory format, threads); threads 0: every core
VARIANTS = [
    ("fp32", "contiguous", 0),
    ("bf16", "contiguous", 0),
    ("fp32", "channels_last", 0),
    ("bf16", "channels_last", 0),
    ("fp32", "contiguous", 1),
    ("bf16", "contiguous", 1),
]


def unet_of(ch: int) -> UNetConfig:
    """The CIFAR-10 UNet's shape at base width `ch` with levels 1-2-2 (32, 16, 8; attention at 16)."""
    return replace(UNET_CONFIGS["cifar10"], ch=ch, ch_mult=(1, 2, 2), dropout=0.0)


def images_per_second(ch: int, variant: tuple, batch: int, steps: int, cores: int) -> float:
    precision, memory, threads = variant
    torch.set_num_threads(threads or cores)
    recipe = Recipe(model="cifar10", batch_size=batch, dropout=0.0)
    state = build_state(recipe, torch.device("cpu"), channels_last=memory == "channels_last", unet=unet_of(ch))
    x = (torch.rand(batch, 3, 32, 32) * 2 - 1).contiguous(memory_format=state.memory_format)
    train_step(state, state.model, x, recipe, precision == "bf16")  # warm-up: oneDNN picks its kernels
    start = time.perf_counter()
    for _ in range(steps):
        train_step(state, state.model, x, recipe, precision == "bf16")
    return batch * steps / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="UNet base widths (ch; 128 is the paper's)")
    p.add_argument("--batch-size", type=int, default=64, help="images per training step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds (the median is reported)")
    p.add_argument("--smoke", action="store_true", help="ch 32, batch 2, one step and round: a check that it runs")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.batch_size, args.steps, args.rounds = [32], 2, 1, 1
    cores = torch.get_num_threads()
    info = machine()
    print(describe(info), flush=True)
    rows = []
    for ch in args.sizes:
        params = sum(
            p.numel()
            for p in build_state(Recipe(model="cifar10"), torch.device("cpu"), unet=unet_of(ch)).model.parameters()
        )
        rounds: list[dict] = []
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            rounds.append({v: images_per_second(ch, v, args.batch_size, args.steps, cores) for v in order})
        base = VARIANTS[0]
        for v in VARIANTS:
            precision, memory, threads = v
            row = {
                "ch": ch,
                "params_m": round(params / 1e6, 2),
                "precision": precision,
                "memory_format": memory,
                "threads": threads or cores,
                "img_per_s": statistics.median(r[v] for r in rounds),
                "ratio": statistics.median(r[v] / r[base] for r in rounds),
                "ratio_spread": [min(r[v] / r[base] for r in rounds), max(r[v] / r[base] for r in rounds)],
            }
            rows.append(row)
            print(
                f"UNet ch {ch} ({row['params_m']}M) {precision} {memory:13s} {row['threads']} thread(s): "
                f"{row['img_per_s']:7.1f} img/s  x{row['ratio']:.2f} ({row['ratio_spread'][0]:.2f}-{row['ratio_spread'][1]:.2f})",
                flush=True,
            )
    torch.set_num_threads(cores)
    if args.json:
        meta = {
            "machine": info,
            "torch": torch.__version__,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "rounds": args.rounds,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
