"""The GPU quality run: the paper's CIFAR-10 UNet trained on one GPU for a fixed few minutes, then
judged on its DDIM-50 samples by the kept CIFAR-10 judge (diffusion/classifier.py: FD-CIFAR10 in
its features, not FID), with a grid to look at. No Ray, no MLflow: torch and the shared JPEG copy
of CIFAR-10, carried with the call (bench/gpu.sh --quality).

    bash bench/gpu.sh --quality                 # on the device machine: about 8 minutes of one GPU
    python bench/gpu_quality.py --smoke         # on a CPU: the same steps at smoke size, a minute

Steps, each result written to --out as it is made (results.json rewritten after each):
  1. the data decoded, kept on the GPU; the judge's view of the real test split (the floor)
  2. the untrained UNet's samples, judged (the line a trained model must fall far below)
  3. training for --train-minutes: bf16 autocast, compiled, the paper's recipe with a short
     warm-up and a short EMA (0.999: the paper's 0.9999 averages over more steps than a few
     minutes make), the loss every 100 steps
  4. --n DDIM-50 samples (eta 0, quadratic tau, as DDIM's CIFAR-10 rows) of the EMA weights,
     judged: FD-CIFAR10, classifier score, confident share, class shares; grid.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from cifar10_judge import SHARED_CIFAR, load_splits  # bench/cifar10_judge.py, beside this script
from core import machine
from quality import as_images, generate  # bench/quality.py: its sampling loop and uint8 view

from diffusion.classifier import Scorer, cifar10_judge
from diffusion.config import RECIPES, SamplerSettings
from diffusion.images import save_grid, to_model_input
from diffusion.pipeline import Pipeline
from diffusion.speed import default_device
from diffusion.training import DeviceData, build_state, train_step
from diffusion.unet import build_unet

CARRIED = Path("data/cifar10-jpeg.tar.gz")  # where bench/gpu.sh --quality puts the archive it carries


def samples(model: torch.nn.Module, betas: torch.Tensor, settings: SamplerSettings, n: int, batch: int) -> torch.Tensor:
    """Samples of seeds 0..n-1 in [-1, 1], (n, C, H, W), on the CPU (made in bf16 on a GPU)."""
    return generate(Pipeline(model, betas, batch), settings, n, batch).cpu()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_source = CARRIED if CARRIED.exists() else SHARED_CIFAR
    p.add_argument(
        "--source", type=Path, default=default_source, help="CIFAR-10: the JPEG copy or the official archive"
    )
    p.add_argument(
        "--train-minutes", type=float, default=5.0, help="training time (the compile's first steps included)"
    )
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--n", type=int, default=10_000, help="DDIM-50 samples judged")
    p.add_argument("--sample-batch", type=int, default=1000, help="samples per model call")
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu-quality"), help="results.json and grid.png")
    p.add_argument("--smoke", action="store_true", help="the tiny UNet, 3 steps, 16 samples of DDIM-2 on a CPU")
    args = p.parse_args(argv)
    if not args.source.exists():
        p.error(f"--source {args.source} does not exist: carry the CIFAR-10 JPEG archive (bench/gpu.sh --quality)")
    device = torch.device("cpu") if args.smoke else default_device()
    model = "tiny" if args.smoke else "cifar10"
    recipe = RECIPES[model].replace(batch_size=args.batch_size, warmup_steps=200, ema_decay=0.999)
    settings = SamplerSettings("ddim", 2 if args.smoke else 50, 0.0, "quadratic")
    if args.smoke:
        args.train_minutes, args.n, args.sample_batch, recipe = 0.0, 16, 8, recipe.replace(batch_size=4)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(device.type), "torch": torch.__version__, "recipe": recipe.to_dict()}
    results |= {"sampler": settings.label(recipe.num_timesteps), "n": args.n, "seeds": f"0..{args.n - 1}"}
    start = time.time()

    def write(**new) -> None:
        results.update(new, seconds=round(time.time() - start, 1))
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(new), flush=True)

    data = load_splits(args.source)
    train, test = data["train"][0], data["test"][0]
    if args.smoke:
        train, test = train[:64], test[:32]  # (all there is of a small --source)
    scorer = Scorer(cifar10_judge().to(device), train.numpy(), test.numpy())
    write(step="data", train_images=len(train), floor=scorer.floor, floor_n=scorer.floor_n)

    state = build_state(recipe, device, channels_last=device.type == "cuda")
    torch.manual_seed(recipe.seed)
    untrained = build_unet(model).to(device)
    x = samples(untrained, state.schedule.betas, settings, args.n, args.sample_batch)
    write(step="untrained", untrained=scorer(as_images(x)))

    net = torch.compile(state.model) if device.type == "cuda" else state.model
    images, losses, trained = DeviceData(train.to(device)), [], time.time()
    while state.step < 3 or time.time() - trained < args.train_minutes * 60:
        for batch, _ in images.epoch(recipe.batch_size):  # unconditional: no labels
            loss, _ = train_step(state, net, to_model_input(batch), recipe, bf16=device.type == "cuda")
            if state.step % 100 == 0 or args.smoke:
                losses.append((state.step, loss.item()))
            if time.time() - trained >= args.train_minutes * 60 and state.step >= 3:
                break
    minutes = (time.time() - trained) / 60
    write(
        step="trained",
        steps=state.step,
        train_minutes=round(minutes, 2),
        img_per_s=state.step * recipe.batch_size / 60 / minutes,
        losses=losses,
    )

    x = samples(state.ema.ema_model, state.schedule.betas, settings, args.n, args.sample_batch)
    save_grid(x[:64], args.out / "grid.png")
    write(step="judged", ema=scorer(as_images(x)))
    print(f"done in {time.time() - start:.0f} s: {args.out}/results.json, grid.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
