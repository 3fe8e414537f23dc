"""DDPM and DDIM in plain PyTorch: schedules, the Ho et al. UNet, samplers, interpolation.

This package imports only torch and numpy (torchvision when writing PNGs); Ray, MLflow
and boto3 live in the modules that need them (`diffusion.data` needs pyarrow).
"""

from .checkpoint import load_checkpoint
from .ema import EMA
from .images import from_uint8, save_grid, to_model_input, to_uint8
from .interpolate import ddim_interpolate, ddim_interpolate_images, ddpm_interpolate, slerp
from .samplers import (
    Recorded,
    ddim_invert,
    ddim_sample,
    ddim_sigmas,
    ddpm_sample,
    fixed_batch,
    make_generators,
    randn,
    timesteps,
)
from .schedule import NoiseSchedule, l_simple, make_betas
from .unet import UNET_CONFIGS, UNet, UNetConfig, build_unet

__all__ = [
    "EMA",
    "NoiseSchedule",
    "Recorded",
    "UNET_CONFIGS",
    "UNet",
    "UNetConfig",
    "build_unet",
    "ddim_interpolate",
    "ddim_interpolate_images",
    "ddim_invert",
    "ddim_sample",
    "ddim_sigmas",
    "ddpm_interpolate",
    "ddpm_sample",
    "fixed_batch",
    "load_checkpoint",
    "from_uint8",
    "l_simple",
    "make_betas",
    "make_generators",
    "randn",
    "save_grid",
    "slerp",
    "timesteps",
    "to_model_input",
    "to_uint8",
]
