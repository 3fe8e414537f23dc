"""DDPM and DDIM in plain PyTorch: schedules, the Ho et al. UNet, samplers (DDPM, DDIM,
DPM-Solver++), interpolation,
training steps, checkpoints and FID maths. The core: it imports torch and numpy only
(torchvision to write PNGs), and local checkpoints load without anything else.

`diffusion.platform` is the layer around it (object storage, Ray, MLflow, HTTP, and the URIs
s3://, runs:/, models:/); the core never imports it.

The names below are imported on first use, so that `import diffusion.config` (all the command
lines need to parse their options) does not import torch.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "checkpoint": ("CheckpointError", "load_checkpoint", "read_checkpoint"),
    "config": ("RECIPES", "Recipe", "SamplerSettings", "Speed"),
    "ema": ("EMA",),
    "images": ("from_uint8", "random_flip", "save_grid", "to_model_input", "to_uint8"),
    "interpolate": ("ddim_interpolate", "ddim_interpolate_images", "ddpm_interpolate", "slerp"),
    "samplers": (
        "Recorded",
        "ddim_invert",
        "ddim_sample",
        "ddim_sigmas",
        "ddpm_sample",
        "dpm_solver_sample",
        "fixed_batch",
        "make_generators",
        "randn",
        "timesteps",
    ),
    "pipeline": ("Pipeline",),
    "schedule": ("NoiseSchedule", "l_simple", "make_betas"),
    "unet": ("UNET_CONFIGS", "UNet", "UNetConfig", "build_unet"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'diffusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value
