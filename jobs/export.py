"""Export a checkpoint as a Hugging Face diffusers DDPMPipeline folder: the UNet (EMA weights by
default) and a DDPMScheduler carrying the checkpoint's betas, variance and clipping.

    python jobs/export.py --checkpoint runs/cifar10-linear --out exported/cifar10
    python jobs/export.py --checkpoint runs:/<mlflow run id> --out exported/raw --weights raw
    python jobs/export.py --checkpoint runs/cifar10-classes --out models/cifar10-classes --dtype float16

Then, anywhere diffusers runs: DDPMPipeline.from_pretrained("exported/cifar10")(batch_size=16). A
class-conditional model is a UNet2DModel with class embeddings (`num_class_embeds` = classes + 1,
the last the null class; its class names in unet/config.json's `_class_names`), which diffusers
calls as unet(x_t, t, class_labels=y) (docs/weights.md samples it with guidance).
Needs diffusers: pip install 'ray-diffusion[diffusers]'.
"""

from __future__ import annotations

from pathlib import Path

from diffusion.platform.cli import add_checkpoint_options, checkpoint_options, parser, run


def main(argv=None) -> int:
    p = parser(__doc__)
    add_checkpoint_options(p)
    p.add_argument("--out", required=True, help="a new (or empty) folder for the DDPMPipeline")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16"],
        help="of the weights written (float16: half the size)",
    )
    args = p.parse_args(argv)
    source = checkpoint_options(args)

    import torch

    from diffusion.checkpoint import betas_from, class_names, model_from, sampling_defaults
    from diffusion.convert import export_diffusers

    payload = source.read()
    model = model_from(payload, ema=source.ema)
    dtype = getattr(torch, args.dtype)
    out = export_diffusers(
        model, betas_from(payload), sampling_defaults(payload), Path(args.out), class_names(payload), dtype
    )
    print(f"wrote {out}: DDPMPipeline of the {source.weights} weights of {args.checkpoint} (step {payload['step']})")
    return 0


if __name__ == "__main__":
    run(main)
