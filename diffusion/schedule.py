"""The forward (noising) process of DDPM: beta schedules, q(x_t | x_0), the posterior
q(x_{t-1} | x_t, x_0) and the L_simple training loss.

Equation numbers refer to Ho, Jain and Abbeel, "Denoising Diffusion Probabilistic
Models" (2020). Timesteps are 0-based integers 0..T-1 as in the reference
implementations: index t here is the paper's t+1, so index 0 is the paper's t=1 and
"abar_{t-1}" at index 0 is 1 (no noise).

Schedules are computed in float64; coefficients are gathered in float64 and cast to
the dtype of the tensor they scale.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from .config import SCHEDULES


def make_betas(
    name: str = "linear",
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> Tensor:
    """The 1-D float64 beta schedule of length `num_timesteps`.

    linear: beta_1..beta_T evenly spaced from 1e-4 to 0.02 (DDPM section 4, T=1000).
    cosine: Nichol and Dhariwal (2021) eq. (17): abar(t) = f(t)/f(0) with
        f(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2, beta_t = 1 - abar(t)/abar(t-1),
        clipped at 0.999 to avoid the singularity at t = T.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name == "linear":
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(
                f"linear schedule needs 0 < beta_start <= beta_end < 1, "
                f"got beta_start={beta_start}, beta_end={beta_end}"
            )
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if name == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
        return betas.clamp(max=max_beta)
    raise ValueError(f"unknown beta schedule {name!r}: choose one of {', '.join(SCHEDULES)}")


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] shaped (B, 1, 1, ...) to broadcast against `like`, in like's dtype (`values` is
    copied to t's device unless it is there already: training keeps its schedule there)."""
    out = values.to(t.device)[t].to(like.dtype)
    return out.view(-1, *([1] * (like.dim() - 1)))


class NoiseSchedule:
    """The quantities of the forward process derived from one beta schedule.

    All tensors are float64 of shape (T,), indexed by the 0-based timestep.
    """

    def __init__(self, betas: Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.dim() != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1)")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # beta-tilde, eq. (7): the variance of q(x_{t-1} | x_t, x_0).
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # The two coefficients of mu-tilde, eq. (7).
        self.posterior_mean_coef_x0 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)

    @classmethod
    def from_name(cls, name: str = "linear", num_timesteps: int = 1000, **kwargs) -> "NoiseSchedule":
        return cls(make_betas(name, num_timesteps, **kwargs))

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """This schedule with every tensor on `device` (float64 still), where a training step
        indexes them: no host-to-device copy in the step."""
        moved = copy.copy(self)
        for name, value in vars(self).items():
            setattr(moved, name, value.to(device))
        return moved

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, the closed form of q(x_t | x_0), eq. (4)."""
        abar = _gather(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), eq. (15)."""
        abar = _gather(self.alphas_cumprod, t, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean mu-tilde(x_t, x_0) and variance beta-tilde of q(x_{t-1} | x_t, x_0), eqs. (6)-(7)."""
        mean = _gather(self.posterior_mean_coef_x0, t, x_t) * x0 + _gather(self.posterior_mean_coef_xt, t, x_t) * x_t
        return mean, _gather(self.posterior_variance, t, x_t)


def l_simple(
    model,
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """L_simple, eq. (14) (Algorithm 1): E ||eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t)||^2,
    of a class-conditional eps_theta(x_t, t, y) given `labels` y.

    t ~ Uniform{0..T-1} and eps ~ N(0, I) are drawn unless given; giving both makes the
    loss deterministic (a held-out evaluation on a fixed set of (image, t, noise)).
    Returns the mean over all elements (the reference implementation's mean squared error).
    """
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = schedule.q_sample(x0, t, noise)
    eps = model(x_t, t) if labels is None else model(x_t, t, labels)
    return torch.mean((noise - eps.float()) ** 2)
