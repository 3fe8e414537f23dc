"""Sample a checkpoint to a PNG grid, in this one process: no Ray, no MLflow run, CPU or GPU.

    python jobs/generate.py --checkpoint runs/tiny-linear --n 64 --out grid.png
    python jobs/generate.py --checkpoint weights/ddpm-cifar10-32 --sampler ddpm --variance beta --n 16 --out ddpm.png
    python jobs/generate.py --checkpoint runs/tiny-linear --figures figures/ --data data/cifar10   # the papers' figures

--checkpoint takes what every job takes: a run folder (its latest checkpoint; --which best for
its best), a checkpoint, s3://..., runs:/<id>[/<artifact path>], models:/<name>/<version or @alias>,
a diffusers folder or a DDPM reference state dict. --figures writes the papers' figures as
labelled PNGs; the DDPM interpolation runs between two real images from --data (a prepared
data set) or --images (two files), else between two of the model's samples.
"""

from __future__ import annotations

from diffusion.platform.cli import (
    add_checkpoint_options,
    add_sampler_options,
    parser,
    run,
    sampler_settings,
    sampler_speed,
)


def main(argv=None) -> int:
    p = parser(__doc__)
    add_checkpoint_options(p)
    p.add_argument("--n", type=int, default=64, help="number of images (seeds seed .. seed + n - 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--batch-size", type=int, default=64, help="images per model batch (the fixed batch shape)")
    add_sampler_options(p)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write")
    p.add_argument("--figures", default=None, metavar="DIR", help="also write the papers' figures (labelled PNGs) here")
    p.add_argument("--figure-seeds", type=int, default=8, help="seeds per figure (an even number)")
    p.add_argument("--data", default=None, help="prepared data set: two of its images for the DDPM interpolation")
    p.add_argument("--images", nargs=2, default=None, metavar="PNG", help="or two image files for it")
    args = p.parse_args(argv)
    settings = sampler_settings(args)
    if args.n < 1 or args.batch_size < 1:
        p.error("--n and --batch-size must be >= 1")
    if args.figure_seeds < 2 or args.figure_seeds % 2:
        p.error("--figure-seeds must be an even number >= 2 (interpolations take seeds in pairs)")

    import time
    from pathlib import Path

    import torch

    from diffusion.images import save_grid
    from diffusion.platform.checkpoints import read_checkpoint
    from diffusion.platform.progress import progress
    from diffusion.sampling import Sampler

    payload = read_checkpoint(args.checkpoint, args.endpoint_url, which=args.which)
    sampler = Sampler.from_checkpoint(payload, args.batch_size, not args.raw, sampler_speed(args), args.device)
    settings = sampler.settings(settings)
    seeds = list(range(args.seed, args.seed + args.n))
    start, images = time.perf_counter(), []
    with progress(args.n, f"sampling ({settings.label(sampler.num_timesteps)})", unit="img") as bar:
        for first in range(0, args.n, args.batch_size):
            images.append(sampler.samples(seeds[first : first + args.batch_size], settings).cpu())
            bar.update(len(images[-1]))
    path = save_grid(torch.cat(images), args.out)
    print(
        f"wrote {path}: {args.n} images, {settings.label(sampler.num_timesteps)}, in "
        f"{time.perf_counter() - start:.1f} s on {sampler.device}"
    )
    if args.figures:
        from diffusion.figures import batch_size, figures

        pair = real_pair(args, sampler.shape)  # the figures' own batch: no padding to --batch-size
        sampler = Sampler.from_checkpoint(
            payload, batch_size(args.figure_seeds), not args.raw, sampler_speed(args), args.device
        )
        out = Path(args.figures)
        out.mkdir(parents=True, exist_ok=True)
        for figure in figures(sampler, list(range(args.seed, args.seed + args.figure_seeds)), pair):
            figure.save(out / f"{figure.name}.png")
            print(f"wrote {out / figure.name}.png: {figure.title}")
    return 0


def real_pair(args, shape: tuple[int, int, int]):
    """Two real images, uint8 (2, H, W, C), from --images or --data; or None."""
    import numpy as np

    from diffusion.errors import InputError

    channels, size, _ = shape
    if args.images:
        from PIL import Image

        arrays = []
        for path in args.images:
            try:
                with Image.open(path) as image:
                    arrays.append(np.asarray(image.convert("RGB" if channels == 3 else "L").resize((size, size))))
            except OSError as e:
                raise InputError(f"--images {path} is not a readable image ({e})") from None
        return np.stack(arrays).reshape(2, size, size, channels)
    if args.data:
        from diffusion.platform.shards import ShardSet

        return ShardSet.open(args.data, args.endpoint_url, verify="size").first_images(2)
    return None


if __name__ == "__main__":
    run(main)
