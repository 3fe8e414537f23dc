"""Step 0 of bench/gpu.sh: that the GPU paths run at all, in about a minute, before a lease is
spent timing them. Each check is written to preflight.json as it finishes:

  train      3 cifar10 training steps with bf16 autocast, fused Adam and torch.compile under
             torch.cuda.set_sync_debug_mode("warn"): the host syncs of each step (the first one
             compiles; the later ones must have none)
  graphs     DDIM sampling with the compiled sampler (on CUDA: one CUDA graph per model call)
             against eager at one fixed batch: the largest absolute difference
  round_trip a checkpoint saved, loaded and sampled: the same images as the model it came from

    python bench/preflight.py --out bench/results/gpu          # on a GPU
    python bench/preflight.py --smoke --out /tmp/preflight     # the same checks on a CPU, tiny UNet, no compile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from core import machine  # bench/core.py, beside this script

from diffusion.checkpoint import read_checkpoint, save_checkpoint
from diffusion.config import RECIPES, SamplerSettings, Speed
from diffusion.pipeline import Pipeline
from diffusion.training import build_state, train_step


def host_syncs(fn) -> int:
    """How many synchronising CUDA calls `fn` makes (sync debug mode "warn": one warning each)."""
    if not torch.cuda.is_available():
        fn()
        return 0
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()  # after the count: the step's own work ends before the next is timed
    return sum("synchronizing" in str(w.message) for w in caught)


def check_train(config, device, compile: bool) -> dict:
    cuda = device.type == "cuda"  # bf16 autocast and channels_last, as training on a GPU
    state = build_state(config, device, channels_last=cuda)
    net = torch.compile(state.model) if compile else state.model
    unet = state.model.config
    x0 = torch.rand(config.batch_size, unet.in_channels, unet.image_size, unet.image_size, device=device) * 2 - 1
    x0 = x0.to(memory_format=torch.channels_last) if cuda else x0
    syncs, seconds = [], []
    for _ in range(3):
        start = time.perf_counter()
        syncs.append(host_syncs(lambda: train_step(state, net, x0, config, bf16=cuda)))
        seconds.append(time.perf_counter() - start)
    fused = all(group.get("fused") for group in state.optimizer.param_groups)
    ok = all(s == 0 for s in syncs[1:])
    return {"ok": ok, "syncs_per_step": syncs, "seconds_per_step": seconds, "fused_adam": fused, "compile": compile}


def perturbed(state) -> None:
    """Weights away from the zero-initialised output layer, so that samples are not all equal."""
    with torch.no_grad():
        for p in state.model.parameters():
            p.add_(0.02 * torch.randn_like(p))


def check_graphs(state, batch: int, compile: bool) -> dict:
    settings, seeds = SamplerSettings("ddim", 10), list(range(batch))
    eager = Pipeline(state.model, state.schedule.betas.cpu(), batch, Speed("fp32")).samples(seeds, settings)
    speed = Speed("fp32", compile=compile)
    compiled = Pipeline(state.model, state.schedule.betas.cpu(), batch, speed).samples(seeds, settings)
    again = Pipeline(state.model, state.schedule.betas.cpu(), batch, speed).samples(seeds, settings)
    diff = (compiled - eager).abs().max().item()
    return {
        "ok": diff < 1e-2 and torch.equal(compiled, again),
        "max_abs_diff": diff,
        "batch": batch,
        "compile": compile,
    }


def check_round_trip(state, config, device) -> dict:
    settings, seeds = SamplerSettings("ddim", 10), [0, 1, 2, 3]
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, state, config)
        loaded = Pipeline.from_checkpoint(read_checkpoint(d), 4, ema=False, speed=Speed("fp32"), device=device)
    direct = Pipeline(state.model, state.schedule.betas.cpu(), 4, Speed("fp32")).samples(seeds, settings)
    same = torch.equal(loaded.samples(seeds, settings), direct)
    return {"ok": same, "identical_samples": same}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/gpu", help="folder of preflight.json")
    p.add_argument("--smoke", action="store_true", help="on a CPU: the tiny UNet, batch 4, no compile")
    p.add_argument("--batch-size", type=int, default=64, help="training and sampling batch (cifar10)")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    compile = device.type == "cuda"
    name, batch = ("tiny", 4) if args.smoke else ("cifar10", args.batch_size)
    config = RECIPES[name].replace(batch_size=batch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(device.type), "torch": torch.__version__, "config": name, "device": device.type}

    def record(key: str, check) -> None:
        start = time.perf_counter()
        try:
            report[key] = {**check(), "seconds": time.perf_counter() - start}
        except Exception as e:  # a check that breaks is the finding: record it, go on with the next
            report[key] = {"ok": False, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - start}
        print(f"{key}: {json.dumps(report[key])}", flush=True)
        partial = out / "preflight.json.partial"
        partial.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(partial, out / "preflight.json")

    record("train", lambda: check_train(config, device, compile))
    state = build_state(config, device, channels_last=device.type == "cuda")
    perturbed(state)
    record("graphs", lambda: check_graphs(state, batch, compile))
    record("round_trip", lambda: check_round_trip(state, config, device))
    ok = all(report[k]["ok"] for k in ("train", "graphs", "round_trip"))
    print(f"preflight {'passed' if ok else 'FAILED'}: {out / 'preflight.json'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
