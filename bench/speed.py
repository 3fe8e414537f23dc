"""Our UNet training step and samplers against Hugging Face diffusers running the same network,
side by side in one process: img/s, the ratio ours/diffusers and MFU, for the cifar10 and
stl10 configs.

    pip install 'ray-diffusion[bench]'     # diffusers, imported by this script only
    python bench/speed.py --smoke                                        # tiny CPU check, seconds
    python bench/speed.py --device cpu --profile --out bench/results/    # CPU: cifar10 train + DDIM-10, batch 8 and 32,
                                                                         # 3 runs (~25 min on 2 cores), profiled steps
    python bench/speed.py --device cuda --out bench/results/             # bf16 (precision auto) + channels_last
    python bench/speed.py --device cuda --compile --out bench/results/   # torch.compile, both sides
    python bench/speed.py --device cuda --configs cifar10 --tasks train ddim10 --rounds 9 --out bench/results/

Tasks, each timed for both sides on the same device, dtype, memory format and batch:
  train     ours: diffusion.training.build_state + train_step (L_simple, backward, clip 1.0, Adam, EMA).
            diffusers: UNet2DModel as in its train_unconditional example: DDPMScheduler.add_noise at
            uniform random t, MSE on eps, backward, clip 1.0, the same Adam, LR warm-up, EMAModel.
  ddimS     ours: diffusion.ddim_sample (eta 0, timesteps range(0, T, T // S)). diffusers: DDIMScheduler
            (leading spacing, steps_offset 0: the same timesteps) in DDIMPipeline's loop.
  ddpm      ours: diffusion.ddpm_sample over all T steps. diffusers: DDPMScheduler in DDPMPipeline's loop.
Sampling ends with the device tensor on both sides (no PIL conversion).

Alternation: for every (config, task, batch) cell the two sides take turns (ours diffusers, diffusers ours, ...):
untimed warm-up calls first, then --rounds timed rounds each; a round repeats the call enough times
to last --min-round-s (the same count for both sides). The row reports each side's median round
and ratio = ours img/s / diffusers img/s (> 1: ours is faster).

MFU = model FLOP/s / peak: forward FLOPs per image from torch.utils.flop_counter (attention counted
through the math SDPA kernel, so that both networks count it), x3 for a training step and x the
number of model calls for a sampler. Peak: dense bf16 of known GPUs (bench/core.py) or --peak-tflops.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import math
import os
import platform
import re
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from core import describe, forward_flops, machine, peak_tflops, timed  # bench/core.py, beside this script
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusion import UNET_CONFIGS, UNetConfig, ddim_sample, ddpm_sample, timesteps
from diffusion.config import RECIPES, Recipe, Speed
from diffusion.convert import diffusers_unet_kwargs
from diffusion.platform.cli import add_options
from diffusion.speed import sampling_model, use_bf16
from diffusion.training import autocast, build_state, fastest_adam, train_step

try:
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
except ImportError as e:  # diffusers is a benchmark-only dependency
    raise SystemExit(f"bench/speed.py needs Hugging Face diffusers: pip install 'ray-diffusion[bench]' ({e})") from e

# Defaults by device. A GPU: both configs, every task, the presets' training batch, 1 run of 5
# rounds. A CPU (minutes per cell): the cifar10 training step and DDIM-10 at batch 8 and 32, in 3
# runs of 3 rounds, so that the ratio's spread over the runs is reported beside it.
DEFAULTS = {
    "cuda": dict(
        configs=["cifar10", "stl10"], tasks=["train", "ddim10", "ddim50", "ddim100", "ddpm"], runs=1, rounds=5
    ),
    "cpu": dict(
        configs=["cifar10"], tasks=["train", "ddim10"], train_batches=[8, 32], sample_batches=[8, 32], runs=3, rounds=3
    ),
}
DEFAULT_SAMPLE_BATCHES = {"cifar10": [64, 256], "stl10": [64]}  # on a GPU
# --smoke (with T=10 and no minimum round time), for options not given: seconds on a CPU.
SMOKE = dict(
    configs=["tiny"],
    tasks=["train", "ddim2", "ddpm"],
    train_batches=[2],
    sample_batches=[2],
    runs=1,
    rounds=1,
    warmup=0,
)
# The kernels both networks run on the same shapes: the network's own work, whoever writes it.
# A step made of these alone, at diffusers' cost, bounds how far any implementation can lead.
SHARED_KERNELS = ("convolution", "group_norm", "silu", "bernoulli", "upsample", "constant_pad")


# --- the diffusers side ---------------------------------------------------------------------------


def build_hf_unet(config: UNetConfig) -> UNet2DModel:
    """The UNet2DModel that computes our UNet(config)'s function (diffusion.convert)."""
    return UNet2DModel(**diffusers_unet_kwargs(config))


def hf_scheduler(kind: str, config: Recipe) -> DDIMScheduler | DDPMScheduler:
    """diffusers' DDIM or DDPM scheduler on our linear betas, predicting eps, without clipping (as ours)."""
    if config.schedule != "linear":
        raise ValueError("the diffusers comparison uses the linear schedule")
    common = dict(
        num_train_timesteps=config.num_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="linear",
        clip_sample=False,
        prediction_type="epsilon",
        timestep_spacing="leading",  # T // S * arange(S): our range(0, T, T // S) when S divides T
        steps_offset=0,
    )
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=True)  # the last step returns pred_x0, as ours
    return DDPMScheduler(**common, variance_type="fixed_small")  # beta-tilde, ours' "posterior"


@torch.no_grad()
def hf_sample(unet, scheduler, x_T: torch.Tensor, steps: int, generator=None) -> torch.Tensor:
    """The denoising loop of DDIMPipeline / DDPMPipeline without its PIL conversion. The scheduler
    steps on its CPU timesteps, as the pipelines do; the UNet gets each t as a device tensor made
    before the loop (as pipelines that set device timesteps do), so no step waits on a host copy."""
    scheduler.set_timesteps(steps)
    step_kwargs = {"eta": 0.0} if isinstance(scheduler, DDIMScheduler) else {}
    t_device = [t.clone() for t in scheduler.timesteps.to(x_T.device)]  # separate tensors, not views
    x = x_T
    for t, t_dev in zip(scheduler.timesteps, t_device):
        eps = unet(x, t_dev).sample
        x = scheduler.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
    return x


class DiffusersTrainer:
    """A training step as diffusers' examples/unconditional_image_generation/train_unconditional.py
    takes it (without accelerate), with our optimiser settings and EMA decay."""

    def __init__(self, unet_config: UNetConfig, config: Recipe, device: torch.device, bf16: bool, channels_last: bool):
        self.config, self.device, self.bf16 = config, device, bf16
        self.unet = build_hf_unet(unet_config).to(device)
        if channels_last:
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.unet.parameters(), lr=config.lr, **fastest_adam(device))  # as ours
        self.lr_scheduler = get_scheduler("constant_with_warmup", self.optimizer, num_warmup_steps=config.warmup_steps)
        foreach = {"foreach": True} if "foreach" in inspect.signature(EMAModel.__init__).parameters else {}
        self.ema = EMAModel(self.unet.parameters(), decay=config.ema_decay, **foreach)
        self.noise_scheduler = hf_scheduler("ddpm", config)

    def step(self, net, x0: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype)
        t = torch.randint(0, self.config.num_timesteps, (x0.shape[0],), device=x0.device)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        with autocast(self.bf16, self.device):
            eps = net(noisy, t).sample
        loss = F.mse_loss(eps.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.unet.parameters())
        return loss.detach()


# --- measuring ------------------------------------------------------------------------------------


def count_flops(model, size: int) -> int:
    """Forward FLOPs of one image, counted on a meta-device copy (shapes only, no compute). Attention
    goes through the math SDPA kernel, whose matmuls FlopCounterMode counts, as it would not count a
    fused kernel it has no formula for (on CPU, the flash kernel diffusers' attention picks)."""
    with sdpa_kernel([SDPBackend.MATH]):
        return forward_flops(copy.deepcopy(model).to("meta"), size, "meta")


def _repeat(fn: Callable[[], object], n: int) -> Callable[[], None]:
    def run():
        for _ in range(n):
            fn()

    return run


def alternate(fns: dict[str, Callable[[], object]], rounds: int, warmup: int, min_round_s: float, device: str):
    """Seconds per call of each fn, from rounds taken in turn, the order reversed every other round
    (A B, B A, A B, ...: neither side always goes first on a machine that speeds up or slows down),
    after `warmup` untimed calls each. A round is `reps` calls, enough for the faster side's last
    warm-up call to last min_round_s. Returns ({name: [seconds per call, one per round]}, reps)."""
    last = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            last[name] = timed(fn, 1, 0, device)
    reps = max(1, math.ceil(min_round_s / min(last.values()))) if last and min_round_s > 0 else 1
    seconds = {name: [] for name in fns}
    for i in range(rounds):
        for name, fn in list(fns.items())[:: -1 if i % 2 else 1]:
            seconds[name].append(timed(_repeat(fn, reps), 1, 0, device) / reps)
    return seconds, reps


def parse_task(task: str, num_timesteps: int) -> tuple[str, int]:
    """'train' -> ('train', 1); 'ddimS' -> ('ddim', S); 'ddpm' -> ('ddpm', T): kind and model calls per image."""
    if task == "train":
        return "train", 1
    if task == "ddpm":
        return "ddpm", num_timesteps
    m = re.fullmatch(r"ddim(\d+)", task)
    if not m:
        raise ValueError(f"unknown task {task!r}: use train, ddpm or ddimS (e.g. ddim50)")
    steps = int(m.group(1))
    if not 1 <= steps <= num_timesteps or num_timesteps % steps:
        raise ValueError(f"{task}: S must divide T={num_timesteps} for diffusers' timesteps to equal ours")
    return "ddim", steps


def check_same_timesteps(scheduler: DDIMScheduler, num_timesteps: int, steps: int) -> None:
    scheduler.set_timesteps(steps)
    ours = timesteps(num_timesteps, steps).flip(0).tolist()
    if scheduler.timesteps.tolist() != ours:
        raise RuntimeError(f"diffusers DDIM-{steps} timesteps {scheduler.timesteps.tolist()} differ from ours {ours}")


def recipe(name: str, args) -> Recipe:
    """The named config's training recipe (its preset, else the defaults) with the benchmark's T."""
    return RECIPES.get(name, Recipe(model=name)).replace(model=name, num_timesteps=args.num_timesteps)


def train_batches(name: str, args) -> list[int]:
    """--train-batches, else the config's preset batch."""
    return args.train_batches or [recipe(name, args).batch_size]


class Sides:
    """Both sides of one config on one device: our TrainState and the diffusers trainer, built
    from the same UNetConfig, with a fixed random batch of either side's input."""

    def __init__(self, name: str, args):
        self.device = torch.device(args.device)
        self.config = recipe(name, args)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.state = build_state(self.config, self.device, channels_last=args.channels_last)  # model, Adam, EMA
        self.hf = DiffusersTrainer(self.state.model.config, self.config, self.device, args.bf16, args.channels_last)
        self.models = {"ours": self.state.model, "diffusers": self.hf.unet}
        self.size = self.state.model.config.image_size
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def batch(self, n: int, noise: bool = False) -> torch.Tensor:
        """n images in [-1, 1] (or standard normal x_T with `noise`) on the device."""
        shape = (n, 3, self.size, self.size)
        x = torch.randn(shape, generator=self.gen) if noise else torch.rand(shape, generator=self.gen) * 2 - 1
        return x.to(self.device, memory_format=self.memory_format)

    def train_steps(self, nets: dict, x0: torch.Tensor, bf16: bool) -> dict[str, Callable[[], object]]:
        for m in self.models.values():
            m.train()
        return {
            "ours": lambda: train_step(self.state, nets["ours"], x0, self.config, bf16),
            "diffusers": lambda: self.hf.step(nets["diffusers"], x0),
        }


def bench_config(name: str, args) -> Iterator[dict]:
    """The rows of one config, each yielded as soon as it is measured."""
    torch._dynamo.reset()  # fresh compile caches per config
    sides = Sides(name, args)
    device, config, state, models, size = sides.device, sides.config, sides.state, sides.models, sides.size
    flops = {side: count_flops(m, size) for side, m in models.items()}

    def compiled(mode: str | None) -> dict:
        if not args.compile:
            return dict(models)
        return {side: torch.compile(m, mode=mode, dynamic=False) for side, m in models.items()}

    peak = peak_tflops(args.device, args.peak_tflops)

    def record(task: str, batch: int, calls: int, fns: dict) -> dict:
        seconds, reps = alternate(fns, args.rounds, args.warmup, args.min_round_s, args.device)
        row = {"config": name, "task": task, "batch": batch, "model_calls": calls, "reps": reps, "rounds": args.rounds}
        for side, s in seconds.items():
            med = statistics.median(s)
            tflops = flops[side] * (3 if task == "train" else calls) * batch / med / 1e12
            row |= {
                f"{side}_img_per_s": batch / med,
                f"{side}_tflops": tflops,
                f"{side}_mfu": tflops / peak if peak else None,
                f"{side}_gflop_per_img_forward": flops[side] / 1e9,
                f"{side}_s_per_call": s,
            }
        row["ratio"] = row["ours_img_per_s"] / row["diffusers_img_per_s"]
        # the same from each round pair alone: less sensitive to drift over the cell
        row["ratio_paired_median"] = statistics.median(d / o for o, d in zip(seconds["ours"], seconds["diffusers"]))
        print(format_row(row), flush=True)
        return row

    if "train" in args.tasks:
        nets = compiled(None)
        for batch in train_batches(name, args):
            yield record("train", batch, 1, sides.train_steps(nets, sides.batch(batch), args.bf16))

    sample_tasks = [t for t in args.tasks if t != "train"]
    if sample_tasks:
        nets = compiled("reduce-overhead")  # on CUDA the fixed-shape step runs as a CUDA graph
        for m in models.values():
            m.eval()
        # Ours as Serve and the batch job run it (diffusion.speed): the same precision and compile mode.
        nets["ours"] = sampling_model(state.model, Speed("bf16" if args.bf16 else "fp32", args.compile))
        schedulers = {"ddim": hf_scheduler("ddim", config), "ddpm": hf_scheduler("ddpm", config)}
        betas = state.schedule.betas
        for batch in args.sample_batches or DEFAULT_SAMPLE_BATCHES.get(name, [64]):
            x_T = sides.batch(batch, noise=True)
            for task in sample_tasks:
                kind, calls = parse_task(task, config.num_timesteps)
                if kind == "ddim":
                    check_same_timesteps(schedulers["ddim"], config.num_timesteps, calls)

                def ours(kind=kind, calls=calls, x_T=x_T):
                    with torch.no_grad(), autocast(args.bf16, device):
                        if kind == "ddim":
                            return ddim_sample(nets["ours"], betas, x_T, steps=calls)
                        return ddpm_sample(nets["ours"], betas, x_T)

                def theirs(kind=kind, calls=calls, x_T=x_T):
                    with torch.no_grad(), autocast(args.bf16, device):
                        return hf_sample(nets["diffusers"], schedulers[kind], x_T, calls)

                label = task if kind == "ddim" else f"ddpm{config.num_timesteps}"
                yield record(label, batch, calls, {"ours": ours, "diffusers": theirs})


def profile_train(name: str, batch: int, args, steps: int = 3) -> dict:
    """Self CPU time per training step of every op on each side (torch.profiler), in ms, from
    `steps` profiled steps per side taken in turn after one warm-up step each."""
    sides = Sides(name, args)
    fns = sides.train_steps(sides.models, sides.batch(batch), args.bf16)
    for fn in fns.values():
        fn()
    ops = {side: {} for side in fns}
    for _ in range(steps):
        for side, fn in fns.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                fn()
            for event in prof.key_averages():
                ops[side][event.key] = ops[side].get(event.key, 0.0) + event.self_cpu_time_total / 1e3 / steps
    return {"config": name, "batch": batch, "steps": steps, "ops_ms": ops}


def shared_ms(ops: dict[str, float]) -> float:
    return sum(ms for op, ms in ops.items() if any(k in op for k in SHARED_KERNELS))


def profile_markdown(meta: dict, profiles: list[dict], top: int = 15) -> str:
    lines = [
        "# Training step profile: ours vs diffusers",
        "",
        f"{describe(meta['machine'])}; torch {meta['torch']}, diffusers {meta['diffusers']}; "
        f"{'bf16' if meta['bf16'] else 'fp32'}; self time per step by op (torch.profiler); {meta['date']}.",
        f"Shared kernels: the ops named {', '.join(SHARED_KERNELS)}: the same work on the same shapes on both sides.",
    ]
    for prof in profiles:
        ours, theirs = prof["ops_ms"]["ours"], prof["ops_ms"]["diffusers"]
        total_o, total_d, shared_d = sum(ours.values()), sum(theirs.values()), shared_ms(theirs)
        lines += [
            "",
            f"## {prof['config']}, batch {prof['batch']} (mean of {prof['steps']} profiled steps per side)",
            "",
            f"Step: ours {total_o:.0f} ms, diffusers {total_d:.0f} ms: ratio {total_d / total_o:.3f}. Shared kernels: "
            f"ours {shared_ms(ours):.0f} ms, diffusers {shared_d:.0f} ms ({shared_d / total_d:.0%} of its step), so "
            f"a step of nothing else would lead diffusers by at most {total_d / shared_d:.2f}x.",
            "",
            "| # | ours: op | ms | diffusers: op | ms |",
            "|---:|---|---:|---|---:|",
        ]
        ranked = [sorted(side.items(), key=lambda kv: -kv[1])[:top] for side in (ours, theirs)]
        for i, ((op_o, ms_o), (op_d, ms_d)) in enumerate(zip(*ranked), 1):
            lines.append(f"| {i} | `{op_o}` | {ms_o:.1f} | `{op_d}` | {ms_d:.1f} |")
        differ = sorted(set(ours) | set(theirs), key=lambda op: -abs(ours.get(op, 0) - theirs.get(op, 0)))[:10]
        lines += ["", "Largest differences:", "", "| op | ours ms | diffusers ms |", "|---|---:|---:|"]
        lines += [f"| `{op}` | {ours.get(op, 0):.1f} | {theirs.get(op, 0):.1f} |" for op in differ]
    return "\n".join(lines) + "\n"


# --- output ---------------------------------------------------------------------------------------


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def format_row(row: dict) -> str:
    return (
        f"{row['config']:8s} {row['task']:9s} batch {row['batch']:4d}: ours {row['ours_img_per_s']:10.1f} img/s, "
        f"diffusers {row['diffusers_img_per_s']:10.1f} img/s, ratio {row['ratio']:.3f}, "
        f"MFU {_pct(row['ours_mfu'])} / {_pct(row['diffusers_mfu'])}"
    )


def markdown(meta: dict, rows: list[dict]) -> str:
    flags = ", ".join(f"{k} {'on' if meta[k] else 'off'}" for k in ("bf16", "channels_last", "compile"))
    lines = [
        "# UNet speed: ours vs diffusers",
        "",
        f"{describe(meta['machine'])}; torch {meta['torch']}, diffusers {meta['diffusers']}, "
        f"CUDA {meta['cuda']}; {flags}; T={meta['num_timesteps']}; "
        f"median of {meta['rounds']} alternating rounds, {meta['runs']} run(s); {meta['date']}.",
        "ratio = ours img/s / diffusers img/s.",
        "",
        "| run | config | task | batch | ours img/s | diffusers img/s | ratio | MFU ours | MFU diffusers |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['config']} | {r['task']} | {r['batch']} | {r['ours_img_per_s']:.1f} | "
            f"{r['diffusers_img_per_s']:.1f} | {r['ratio']:.3f} | {_pct(r['ours_mfu'])} | {_pct(r['diffusers_mfu'])} |"
        )
    cells = {}
    for r in rows:
        cells.setdefault((r["config"], r["task"], r["batch"]), []).append(r["ratio"])
    if any(len(ratios) > 1 for ratios in cells.values()):
        lines += ["", "The ratio over the runs:", "", "| config | task | batch | ratio by run | min | max |"]
        lines.append("|---|---|---:|---|---:|---:|")
        for (config, task, batch), ratios in cells.items():
            by_run = ", ".join(f"{x:.3f}" for x in ratios)
            lines.append(f"| {config} | {task} | {batch} | {by_run} | {min(ratios):.3f} | {max(ratios):.3f} |")
    return "\n".join(lines) + "\n"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=list(UNET_CONFIGS), help="UNet configs (default: DEFAULTS)")
    p.add_argument("--tasks", nargs="+", help="train, ddimS (S divides T) and/or ddpm (default: DEFAULTS)")
    p.add_argument(
        "--train-batches", nargs="+", type=int, help="training batches (default: CPU 8 32, GPU the config's preset)"
    )
    p.add_argument(
        "--sample-batches", nargs="+", type=int, help="sampling batches (default: CPU 8 32, GPU 64 256 / stl10 64)"
    )
    p.add_argument("--num-timesteps", type=int, default=1000, help="diffusion steps T of both sides")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    add_options(p.add_argument_group("both sides' UNets"), Speed)
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="channels_last (default: on CUDA)"
    )
    p.add_argument(
        "--runs", type=int, help="times to measure every cell, for the ratio's spread (default: CPU 3, GPU 1)"
    )
    p.add_argument("--rounds", type=int, help="timed rounds per side and cell (median reported; default: CPU 3, GPU 5)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed calls per side first (default: 1, 2 with --compile)"
    )
    p.add_argument("--min-round-s", type=float, default=0.5, help="repeat calls within a round to last this long")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: known GPUs)")
    p.add_argument("--out", default=None, help="write speed-<tag>.json and speed-<tag>.md into this folder")
    p.add_argument(
        "--profile", action="store_true", help="CPU: also profile each training cell's step (profile-<tag>.md, .json)"
    )
    p.add_argument("--tag", default=None, help="file name tag (default: from the device and flags)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CI check: tiny UNet, batch 2, DDIM-2, DDPM with T=10, 1 round (other options still apply)",
    )
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.profile and cuda:  # a GPU step's time is its kernels', which need attributing to ops: not done yet
        p.error("--profile profiles CPU steps: run it with --device cpu")
    if args.smoke:
        args.num_timesteps, args.min_round_s = 10, 0.0
    for key, value in (SMOKE if args.smoke else DEFAULTS["cuda" if cuda else "cpu"]).items():
        if getattr(args, key) is None:  # not given
            setattr(args, key, value)
    args.bf16 = use_bf16(args.precision, torch.device(args.device))  # bf16 autocast, both sides
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    args.warmup = (2 if args.compile else 1) if args.warmup is None else args.warmup
    for t in args.tasks:
        parse_task(t, args.num_timesteps)  # fail before any work
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    meta = {
        "device": device_name(args.device),
        "machine": machine(args.device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bf16": args.bf16,  # autocast on both sides
        "channels_last": args.channels_last,
        "compile": args.compile,
        "num_timesteps": args.num_timesteps,
        "runs": args.runs,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "min_round_s": args.min_round_s,
        "peak_tflops": peak_tflops(args.device, args.peak_tflops),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    print(f"{meta['device']}: torch {meta['torch']}, diffusers {meta['diffusers']}", flush=True)
    tag = args.tag or re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
    tag += "-compile" if args.compile and not args.tag else ""
    tag += "-smoke" if args.smoke and not args.tag else ""
    rows = []
    for run in range(1, args.runs + 1):
        for name in args.configs:
            for row in bench_config(name, args):
                rows.append({"run": run} | row)
                if args.out:  # every cell as it finishes: a run cut short by a time limit keeps them
                    write(Path(args.out), f"speed-{tag}", {"meta": meta, "rows": rows}, markdown(meta, rows))
    print("\n" + markdown(meta, rows))
    if args.profile and "train" in args.tasks:
        profiles = []
        for name in args.configs:
            for batch in train_batches(name, args):
                profiles.append(profile_train(name, batch, args))
                if args.out:
                    write(
                        Path(args.out),
                        f"profile-{tag}",
                        {"meta": meta, "profiles": profiles},
                        profile_markdown(meta, profiles),
                    )
        print("\n" + profile_markdown(meta, profiles))
    if args.out:
        profile = f" and profile-{tag}.json and .md" if args.profile else ""
        print(f"wrote speed-{tag}.json and .md{profile} in {args.out}")


def write(out: Path, name: str, data: dict, table: str) -> None:
    """<name>.json and <name>.md, each file replaced whole (never half-written)."""
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(data, indent=2) + "\n"), (".md", table)):
        partial = out / f"{name}{suffix}.partial"
        partial.write_text(text)
        os.replace(partial, out / f"{name}{suffix}")


if __name__ == "__main__":
    main()
