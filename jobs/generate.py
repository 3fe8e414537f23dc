"""Sample a checkpoint in this one process (no Ray, no MLflow run; CPU or GPU): one PNG per seed,
written as its batch finishes, a grid of the first 64 and, with --figures, the papers' figures.
A class-conditional model draws each of --classes from every seed, guided by --guidance, into a
folder per class, and its grid has a row per class.

    python jobs/generate.py --checkpoint runs/tiny-linear --seeds 0-63 --out samples
    python jobs/generate.py --checkpoint weights/ddpm-cifar10-32 --sampler ddpm --variance beta --seeds 0-15 --out ddpm
    python jobs/generate.py --checkpoint runs/tiny-linear --seeds 0-7 --out figures --figures --data data/cifar10
    python jobs/generate.py --checkpoint models/cifar10-classes --classes 0-9 --seeds 0-9 --guidance 3 --out classes

The flags mean what they mean to jobs/sample.py (the same job on a Ray cluster, tracked in
MLflow). --checkpoint takes what every job takes: a run folder (its latest checkpoint; --which
best for its best), a checkpoint, s3://..., runs:/<id>[/<artifact path>], models:/<name>/<version
or @alias>, a diffusers folder or a DDPM reference state dict. --figures prints what the figures
cost (model calls, and minutes at the speed measured here) before it starts, and writes each as
soon as it is done; the DDPM interpolation runs between two real images from --data (a prepared
data set) or --images (two files), else between two of the model's samples.
"""

from __future__ import annotations

from diffusion.platform.cli import (
    add_sampling_options,
    checkpoint_options,
    parser,
    run,
    sampler_settings,
    sampler_speed,
    seeds_of,
)


def main(argv=None) -> int:
    p = parser(__doc__)
    add_sampling_options(p, n=64, batch_size=64, workers=False)
    p.add_argument("--images", nargs=2, default=None, metavar="PNG", help="two image files for the DDPM interpolation")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--npz", default=None, help="also write every image to this .npz: images (uint8 N x H x W x C), seeds, labels"
    )
    args = p.parse_args(argv)
    seeds, settings, source, speed = (
        seeds_of(args, p),
        sampler_settings(args),
        checkpoint_options(args),
        sampler_speed(args),
    )

    import time
    from pathlib import Path

    import torch

    from diffusion import classes
    from diffusion.checkpoint import class_names
    from diffusion.images import png, save_grid
    from diffusion.pipeline import Pipeline, as_uint8_hwc, steps_of
    from diffusion.platform.progress import model_calls, sample_figures

    payload = source.read()
    names = class_names(payload)
    asked = classes.resolve(args.classes, names) if args.classes is not None else None
    image_seeds, image_classes = classes.images(seeds, asked, len(names))
    model_batch = min(args.batch_size, len(image_seeds))  # no larger than the images: no padding
    pipeline = Pipeline.from_checkpoint(payload, model_batch, source.ema, speed, args.device)
    settings = pipeline.settings(settings)
    label = settings.label(pipeline.num_timesteps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = [range(i, min(i + model_batch, len(image_seeds))) for i in range(0, len(image_seeds), model_batch)]
    if image_classes is None:  # the grid: the first 64 (square), or a row per class
        order, nrow = list(range(min(64, len(image_seeds)))), None
    else:
        rows = classes.rows(image_classes)
        order, nrow = [i for row in rows for i in row], len(rows[0])
    shown = set(order)
    start, kept, every = time.perf_counter(), {}, []  # kept: the grid's images; every: uint8 ones for --npz
    with model_calls(pipeline, len(batches) * steps_of(settings, pipeline.num_timesteps), f"sampling {label}"):
        for batch in batches:
            batch_seeds = [image_seeds[i] for i in batch]
            batch_classes = None if image_classes is None else [image_classes[i] for i in batch]
            images = pipeline.samples(batch_seeds, settings, classes=batch_classes).cpu()
            as_uint8 = as_uint8_hwc(images).numpy()
            for i, image, uint8 in zip(batch, images, as_uint8):
                path = out / f"{image_seeds[i]:010d}.png"  # the file name jobs/sample.py gives it
                if image_classes is not None:
                    path = out / names[image_classes[i]] / path.name  # a folder per class, as image folders are
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(png(uint8))
                if i in shown:
                    kept[i] = image
            if args.npz:
                every.extend(as_uint8)
    save_grid(torch.stack([kept[i] for i in order]), out / "samples.png", nrow=nrow)
    if args.npz:
        import numpy as np

        labels = np.asarray(image_classes if image_classes is not None else [-1] * len(image_seeds), dtype=np.int64)
        seeds_of_images = np.asarray(image_seeds, dtype=np.int64)
        np.savez_compressed(args.npz, images=np.stack(every), seeds=seeds_of_images, labels=labels)
    what = "one per seed" if image_classes is None else f"{len(set(image_classes))} classes, a folder each"
    print(
        f"wrote {len(image_seeds)} PNGs ({what}) and samples.png to {out}: {label}, model batch {model_batch}, "
        f"in {time.perf_counter() - start:.1f} s on {pipeline.device}"
    )
    if args.figures or args.full_figures:
        from diffusion.figures import Plan, batch_size

        pair = real_pair(args, pipeline.shape)
        pipeline = Pipeline.from_checkpoint(  # the figures' own batch: no padding to --batch-size
            payload, batch_size(args.figure_seeds, settings.guided), source.ema, speed, args.device
        )
        figure_seeds = tuple(range(seeds[0], seeds[0] + args.figure_seeds))
        plan = Plan.of(
            settings, pipeline.num_timesteps, figure_seeds, pair is not None, args.full_figures, len(names), asked
        )
        (out / "figures").mkdir(exist_ok=True)
        for figure in sample_figures(pipeline, plan, pair):
            figure.save(out / "figures" / f"{figure.name}.png")
            print(f"wrote {out / 'figures' / figure.name}.png: {figure.title}", flush=True)
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
