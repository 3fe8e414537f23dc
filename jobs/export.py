"""Export a checkpoint as a Hugging Face diffusers DDPMPipeline folder: the UNet (EMA weights by
default) and a DDPMScheduler carrying the checkpoint's betas, variance and clipping.

    python jobs/export.py --checkpoint runs/cifar10-linear --out exported/cifar10
    python jobs/export.py --checkpoint runs:/<mlflow run id> --out exported/raw --weights raw

Then, anywhere diffusers runs: DDPMPipeline.from_pretrained("exported/cifar10")(batch_size=16).
Needs diffusers: pip install 'ray-diffusion[diffusers]'.
"""

from __future__ import annotations

from pathlib import Path

from diffusion.platform.cli import add_checkpoint_options, checkpoint_options, parser, run


def main(argv=None) -> int:
    p = parser(__doc__)
    add_checkpoint_options(p)
    p.add_argument("--out", required=True, help="a new (or empty) folder for the DDPMPipeline")
    args = p.parse_args(argv)
    source = checkpoint_options(args)

    from diffusion.checkpoint import betas_from, model_from, sampling_defaults
    from diffusion.convert import export_diffusers

    payload = source.read()
    model = model_from(payload, ema=source.ema)
    out = export_diffusers(model, betas_from(payload), sampling_defaults(payload), Path(args.out))
    print(f"wrote {out}: DDPMPipeline of the {source.weights} weights of {args.checkpoint} (step {payload['step']})")
    return 0


if __name__ == "__main__":
    run(main)
