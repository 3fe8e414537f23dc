"""Sample a PNG grid with DDIM or DDPM.

Until the training job lands, this samples from a randomly initialised UNet of the chosen
config: the pipeline (model -> sampler -> grid) is real, the pictures are noise-like.

    python jobs/generate.py --config tiny --sampler ddim --steps 50 --n 64 --out runs/samples.png
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusion import build_unet, ddim_sample, ddpm_sample, make_betas, make_generators, randn, save_grid
from diffusion.unet import UNET_CONFIGS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=sorted(UNET_CONFIGS), help="UNet config (randomly initialised)")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"], help="beta schedule, T=1000")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="DDIM (eta, steps) or DDPM (1000 steps)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (length of the tau sub-sequence)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    p.add_argument("--spacing", default="uniform", choices=["uniform", "quadratic"], help="DDIM tau spacing")
    p.add_argument("--variance", default="posterior", choices=["posterior", "beta"], help="DDPM sigma^2")
    p.add_argument("--n", type=int, default=16, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", default="runs/samples.png", help="output PNG grid")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = build_unet(args.config).to(args.device).eval()
    betas = make_betas(args.schedule)
    size, channels = model.config.image_size, model.config.in_channels
    generators = make_generators(range(args.seed, args.seed + args.n), args.device)
    x_T = randn((args.n, channels, size, size), generators, args.device)
    start = time.perf_counter()
    with torch.no_grad():
        if args.sampler == "ddim":
            x = ddim_sample(model, betas, x_T, args.steps, args.eta, args.spacing, generator=generators)
        else:
            x = ddpm_sample(model, betas, x_T, args.variance, generator=generators)
    seconds = time.perf_counter() - start
    path = save_grid(x, args.out)
    print(
        f"wrote {path}: {args.n} images from a randomly initialised {args.config} UNet, "
        f"{args.sampler} in {seconds:.1f} s on {args.device}"
    )


if __name__ == "__main__":
    main()
