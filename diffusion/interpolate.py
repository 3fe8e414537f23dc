"""Interpolation between two images in the latent spaces of DDIM and DDPM.

- DDIM (Song et al. 2021, section 5.3, slerp of appendix D.5 eq. (67)): slerp between two x_T and decode each with the
  deterministic sampler (eta = 0). Real images are first encoded with `ddim_invert`.
- DDPM (Ho et al. 2020, section 4.4): noise both images to step t with q(x_t | x_0),
  interpolate linearly, and decode with the reverse process from t. The reverse-process
  noise is the same for every lambda, so the rows differ only by lambda.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .samplers import Model, ddim_invert, ddim_sample, ddpm_sample, make_generators, randn
from .schedule import NoiseSchedule


def slerp(z0: Tensor, z1: Tensor, lam: float) -> Tensor:
    """Spherical linear interpolation: sin((1-lam) theta)/sin(theta) z0 + sin(lam theta)/sin(theta) z1.

    z0, z1 are (B, ...): the angle theta is taken per item over all other dims (over the
    whole tensor if 1-D). For Gaussian noise, whose norm concentrates at sqrt(dim), the
    result keeps that norm where a linear interpolation would shrink it.
    """
    if z0.shape != z1.shape:
        raise ValueError(f"slerp needs two tensors of one shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    dims = tuple(range(1, z0.dim())) if z0.dim() > 1 else (0,)
    norms = torch.linalg.vector_norm(z0, dim=dims, keepdim=True) * torch.linalg.vector_norm(z1, dim=dims, keepdim=True)
    cos = (z0 * z1).sum(dims, keepdim=True) / norms
    theta = torch.acos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    parallel = sin.abs() < 1e-6  # the two directions coincide: fall back to a linear interpolation
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    w0 = torch.where(parallel, torch.full_like(sin, 1 - lam), torch.sin((1 - lam) * theta) / safe_sin)
    w1 = torch.where(parallel, torch.full_like(sin, lam), torch.sin(lam * theta) / safe_sin)
    return w0 * z0 + w1 * z1


def _pair(x: Tensor, name: str) -> Tensor:
    """Accept (C, H, W) or (1, C, H, W); return (1, C, H, W)."""
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"{name} must be one image of shape (C, H, W) or (1, C, H, W), got {tuple(x.shape)}")
    return x


def ddim_interpolate(
    model: Model,
    betas: Tensor,
    z0: Tensor,
    z1: Tensor,
    lambdas: Sequence[float],
    steps: int = 50,
    spacing: str = "uniform",
) -> Tensor:
    """Decode slerp(z0, z1, lambda) for every lambda with DDIM (eta = 0): (len(lambdas), C, H, W)."""
    z0, z1 = _pair(z0, "z0"), _pair(z1, "z1")
    x_T = torch.cat([slerp(z0, z1, float(lam)) for lam in lambdas])
    return ddim_sample(model, betas, x_T, steps=steps, eta=0.0, spacing=spacing)


def ddim_interpolate_images(
    model: Model,
    betas: Tensor,
    x0_a: Tensor,
    x0_b: Tensor,
    lambdas: Sequence[float],
    steps: int = 50,
    spacing: str = "uniform",
) -> Tensor:
    """Interpolate two real images: encode both with DDIM inversion, then `ddim_interpolate`."""
    z = ddim_invert(model, betas, torch.cat([_pair(x0_a, "x0_a"), _pair(x0_b, "x0_b")]), steps=steps, spacing=spacing)
    return ddim_interpolate(model, betas, z[:1], z[1:], lambdas, steps, spacing)


def ddpm_interpolate(
    model: Model,
    betas: Tensor,
    x0_a: Tensor,
    x0_b: Tensor,
    t: int,
    lambdas: Sequence[float],
    variance: str = "posterior",
    seed: int = 0,
) -> Tensor:
    """DDPM interpolation (DDPM section 4.4): x_t ~ q(x_t | x0_a) and x'_t ~ q(x_t | x0_b)
    (DDPM eq. (4)), x-bar_t = (1 - lambda) x_t + lambda x'_t, decoded by ancestral sampling
    from the 0-based timestep t. Returns (len(lambdas), C, H, W)."""
    x0 = torch.cat([_pair(x0_a, "x0_a"), _pair(x0_b, "x0_b")])
    schedule = NoiseSchedule(betas)
    if not 0 <= t < schedule.num_timesteps:
        raise ValueError(f"t must be a 0-based timestep in [0, {schedule.num_timesteps - 1}], got {t}")
    noise_gen, reverse_seed = make_generators([seed], x0.device)[0], seed + 1
    noise = randn(x0.shape, noise_gen, x0.device, x0.dtype)
    x_t = schedule.q_sample(x0, torch.full((2,), t, dtype=torch.long, device=x0.device), noise)
    x_bar = torch.cat([(1 - lam) * x_t[:1] + lam * x_t[1:] for lam in lambdas])
    reverse_gens = make_generators([reverse_seed] * len(lambdas), x0.device)
    return ddpm_sample(model, betas, x_bar, variance=variance, generator=reverse_gens, t_start=t)
