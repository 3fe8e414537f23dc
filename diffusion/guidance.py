"""Classifier-free guidance (Ho & Salimans 2022) in diffusers' convention, for every sampler.

A class-conditional eps_theta(x_t, t, y) whose null class y = K is the unconditional model (label
dropout trains it, `diffusion.training.training_labels`) is sampled at guidance scale s with

    eps = eps_theta(x_t, t, null) + s (eps_theta(x_t, t, y) - eps_theta(x_t, t, null)),

Ho & Salimans' eq. (6) as diffusers' pipelines write it (their w is s - 1): s = 1 samples the
conditional model, s = 0 the unconditional one, s > 1 pushes each image towards its class. The two
predictions come from one model call on the batch doubled (the images with their classes, then
with the null class). With a guidance interval [t_min, t_max] (Kynkaanniemi et al. 2024,
"Applying guidance in a limited interval improves sample and distribution quality"), a step at a
timestep outside it takes the conditional prediction alone, at half the cost.

`classifier_free_guidance` makes of such a model the (x_t, t) -> eps that every sampler takes, so
DDIM at any eta, DDPM, DPM-Solver++(2M), DDIM inversion, the interpolations and the diffusion
sequences are guided alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .samplers import Model

ConditionalModel = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, y) -> eps


def classifier_free_guidance(
    model: ConditionalModel,
    labels: Tensor,
    null_class: int,
    scale: float = 1.0,
    t_min: int = 0,
    t_max: int | None = None,
) -> Model:
    """The sampler's model (x_t, t) -> eps of `model` guided towards `labels` (B,) at `scale`, at
    0-based timesteps in [t_min, t_max] (t_max None: every t >= t_min). s = 1 (or a step outside
    the interval) is one call of the conditional model, s = 0 one call of the null class: exactly
    what sampling them alone computes."""
    if scale < 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")

    def eps(x_t: Tensor, t: Tensor) -> Tensor:
        inside = t >= t_min if t_max is None else (t >= t_min) & (t <= t_max)
        if scale == 1 or not bool(inside.any()):
            return model(x_t, t, labels)
        null = torch.full_like(labels, null_class)
        everywhere = bool(inside.all())
        if scale == 0 and everywhere:
            return model(x_t, t, null)
        conditional, unconditional = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        guided = unconditional + scale * (conditional - unconditional)
        return guided if everywhere else torch.where(inside.view(-1, *[1] * (x_t.dim() - 1)), guided, conditional)

    return eps
