"""DDPM ancestral sampling, DDIM sampling/inversion and DPM-Solver++(2M): the stable public API.

`model` is any callable (x_t, t) -> predicted noise eps_theta(x_t, t), with x_t of shape
(B, C, H, W) and t a LongTensor of shape (B,) holding 0-based timesteps (index 0 is the
papers' t=1). `betas` is the 1-D beta schedule. Update coefficients are computed in
float64 and applied as Python scalars, so every image of a batch follows exactly the
arithmetic it would follow alone.

Every sampler takes (model, betas, x_T) and then keywords only, in one order: the method's
own (steps, eta, spacing), variance, clip_denoised, generator, record. Their ranges and the
rules between them are `diffusion.config.SamplerSettings`'s, which checks them (an
OptionError, a ValueError, naming the setting).

Reproducibility: pass `generator` as a list with one torch.Generator per image (see
`make_generators`) and the sampler's own arithmetic and noise for image i are the same
whether it is sampled alone or in a batch. The model must match: PyTorch's kernels may
pick a different algorithm for another batch size (on CPU, batch-1 convolutions do), so
wrap it in `fixed_batch(model, size)`, which always evaluates it at one batch shape; then
image i is bit-identical alone or batched, on the same device and dtype.

Equation numbers: "DDPM eq." is Ho et al. (2020); "DDIM eq." is Song et al. (2021); DPM-Solver++
is Lu et al. (2022, arXiv:2211.01095).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .config import SamplerSettings
from .schedule import NoiseSchedule

Model = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


class Recorded(NamedTuple):
    """One recorded step of a trajectory: the state x_t and the model's prediction of x_0."""

    x_t: Tensor
    pred_x0: Tensor


def make_generators(seeds: Iterable[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image, seeded with that image's seed."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def randn(shape: Sequence[int], generator: Generators = None, device=None, dtype=torch.float32) -> Tensor:
    """Standard normal noise of `shape` (B, ...). With a list of generators, item i comes
    from generator i alone, so it does not depend on the other items of the batch."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per image")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def fixed_batch(model: Callable[..., Tensor], batch_size: int) -> Callable[..., Tensor]:
    """`model` evaluated on batches of exactly `batch_size` items: larger batches are split
    and the last chunk is zero-padded, so an item's output does not depend on how many
    others it came with (given a model whose items do not interact, as the UNet's don't).
    Its arguments are per item: (x_t, t) or, for a class-conditional model, (x_t, t, y)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def call(*items: Tensor) -> Tensor:
        outs = []
        for start in range(0, items[0].shape[0], batch_size):
            chunks = [item[start : start + batch_size] for item in items]
            n = chunks[0].shape[0]
            if n < batch_size:
                chunks = [torch.cat([c, c.new_zeros((batch_size - n, *c.shape[1:]))]) for c in chunks]
            outs.append(model(*chunks)[:n])
        return torch.cat(outs)

    return call


def timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> Tensor:
    """The DDIM sub-sequence tau of [0, T), ascending (DDIM section 4.2, appendix D.2).

    uniform:   range(0, T, T // steps), as in the DDIM reference implementation (so
               T=1000, steps=30 gives 31 steps: 0, 33, ..., 990).
    quadratic: (np.linspace(0, np.sqrt(0.8 T), steps) ** 2).astype(int), the DDIM reference's
               numpy float64 arithmetic to the last bit (its rounding at exact squares decides
               a timestep), with the repeated small values dropped (the paper's choice for CIFAR-10).
    """
    SamplerSettings("ddim", steps, spacing=spacing).validate(num_timesteps)
    if spacing == "uniform":
        return torch.arange(0, num_timesteps, num_timesteps // steps, dtype=torch.long)
    seq = (np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2).astype(int)  # quadratic
    return torch.from_numpy(np.unique(seq)).long()  # unique() also sorts ascending


def ddim_sigmas(betas: Tensor, tau: Tensor, eta: float) -> Tensor:
    """sigma_{tau_i}(eta) of DDIM eq. (16), float64, one per entry of tau.

    sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev),
    with abar_prev = abar at tau_{i-1} (and 1 before tau_0). eta=1 over all T steps gives
    the DDPM posterior std sqrt(beta-tilde); eta=0 gives the deterministic DDIM.
    """
    abar_t, abar_prev = _abar_pairs(betas, tau)
    return eta * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).sqrt()


def _abar_pairs(betas: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """abar at each tau_i and at its predecessor tau_{i-1} in the sub-sequence (1 for tau_0)."""
    abar = NoiseSchedule(betas).alphas_cumprod
    abar_t = abar[tau]
    return abar_t, torch.cat([torch.ones(1, dtype=torch.float64), abar_t[:-1]])


def _call(model: Model, x: Tensor, t: int) -> Tensor:
    return model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)).to(x.dtype)


def _pred_x0(x_t: Tensor, eps: Tensor, abar_t: float) -> Tensor:
    """The predicted x_0, DDIM eq. (9) = DDPM eq. (15)."""
    return (x_t - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)


def _clip(x_t: Tensor, eps: Tensor, pred_x0: Tensor, abar_t: float) -> tuple[Tensor, Tensor]:
    """Clip the predicted x_0 to the data range [-1, 1] and re-derive the noise it implies."""
    pred_x0 = pred_x0.clamp(-1, 1)
    return (x_t - math.sqrt(abar_t) * pred_x0) / math.sqrt(1 - abar_t), pred_x0


def _check_record(record: Iterable[int] | None, visited: Iterable[int]) -> set[int]:
    wanted = set() if record is None else {int(t) for t in record}
    missing = sorted(wanted - set(visited))
    if missing:
        raise ValueError(
            f"record asks for timesteps {missing} that this sampler never visits; "
            f"choose among the sampled timesteps (for DDIM, those of timesteps(T, steps, spacing))"
        )
    return wanted


def ddim_sample(
    model: Model,
    betas: Tensor,
    x_T: Tensor,
    *,
    steps: int,
    eta: float = 0.0,
    spacing: str = "uniform",
    variance: str = "posterior",
    clip_denoised: bool = False,
    generator: Generators = None,
    record: Iterable[int] | None = None,
) -> Tensor | tuple[Tensor, dict[int, Recorded]]:
    """DDIM sampling on the sub-sequence tau = timesteps(T, steps, spacing).

    Each step is DDIM eq. (12) (the generative process of eq. (7) with x_0 replaced by its
    prediction, eq. (9)):
        x_{tau_{i-1}} = sqrt(abar_{tau_{i-1}}) pred_x0
                        + sqrt(1 - abar_{tau_{i-1}} - sigma^2) eps_theta(x_{tau_i}, tau_i)
                        + sigma z,
    with sigma = sigma_{tau_i}(eta) of eq. (16) and tau_{i-1} taken from the sub-sequence
    itself. The last step (tau_0) returns pred_x0 with no noise added.

    variance="beta" is the last row of DDIM Table 1 (sigma-hat): the eta = 1 step's mean (the
    posterior mean of q(x_{tau_{i-1}} | x_{tau_i}, x_0) at the predicted x_0) with the larger
    noise sigma-hat_{tau_i} = sqrt(1 - abar_{tau_i} / abar_{tau_{i-1}}) (DDIM appendix D.3; DDPM's
    sigma_t^2 = beta_t on the sub-sequence). It is defined for eta = 1 only.

    Returns the samples, or (samples, {t: Recorded(x_t, pred_x0)}) when `record` lists
    timesteps of tau to keep (for diffusion-sequence figures).
    """
    # eta in [0, 1]: beyond 1, sigma^2 of eq. (16) can exceed 1 - abar_{tau_{i-1}} of eq. (12)
    SamplerSettings("ddim", steps, eta, spacing, variance, clip_denoised).validate(len(betas))
    tau = timesteps(len(betas), steps, spacing)
    abar_t, abar_prev = _abar_pairs(betas, tau)
    sigmas = ddim_sigmas(betas, tau, eta)
    noise_stds = (1 - abar_t / abar_prev).sqrt() if variance == "beta" else sigmas
    wanted, recorded = _check_record(record, tau.tolist()), {}
    x = x_T
    for i in reversed(range(len(tau))):
        t, a_t, a_prev, sigma = int(tau[i]), float(abar_t[i]), float(abar_prev[i]), float(sigmas[i])
        eps = _call(model, x, t)
        pred_x0 = _pred_x0(x, eps, a_t)
        if clip_denoised:
            eps, pred_x0 = _clip(x, eps, pred_x0, a_t)
        if t in wanted:
            recorded[t] = Recorded(x, pred_x0)
        if i == 0:
            x = pred_x0
            break
        x = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev - sigma**2) * eps
        if noise_stds[i] > 0:
            x = x + float(noise_stds[i]) * randn(x.shape, generator, x.device, x.dtype)
    return (x, recorded) if record is not None else x


def ddim_invert(model: Model, betas: Tensor, x_0: Tensor, *, steps: int, spacing: str = "uniform") -> Tensor:
    """Deterministic DDIM encoding x_0 -> x_T: each eta=0 step of `ddim_sample` run backwards.

    The decoding step from tau_i is DDIM eq. (12) with sigma=0 (the Euler step (13) of the
    ODE (14)); its inverse needs eps_theta(x_{tau_i}, tau_i) at the unknown x_{tau_i}, so the
    known x_{tau_{i-1}} stands in for it (the encoding of DDIM section 5.4):
        x_{tau_i} = sqrt(abar_{tau_i}) pred_x0 + sqrt(1 - abar_{tau_i}) eps_theta(x_{tau_{i-1}}, tau_i),
    starting from the clean image (abar = 1). Decoding the result with ddim_sample (same
    steps and spacing, eta=0) returns x_0 up to an error that shrinks with more steps.
    """
    tau = timesteps(len(betas), steps, spacing)
    abar_t, abar_prev = _abar_pairs(betas, tau)
    x = x_0
    for i in range(len(tau)):
        a_from, a_to = float(abar_prev[i]), float(abar_t[i])
        eps = _call(model, x, int(tau[i]))
        x = math.sqrt(a_to) * _pred_x0(x, eps, a_from) + math.sqrt(1 - a_to) * eps
    return x


def dpm_solver_sample(
    model: Model,
    betas: Tensor,
    x_T: Tensor,
    *,
    steps: int,
    spacing: str = "uniform",
    clip_denoised: bool = False,
    record: Iterable[int] | None = None,
) -> Tensor | tuple[Tensor, dict[int, Recorded]]:
    """DPM-Solver++(2M) on the sub-sequence tau = timesteps(T, steps, spacing): the multistep
    second-order solver of the probability-flow ODE with data prediction (Lu et al. 2022,
    "DPM-Solver++", Algorithm 2), one model call per timestep of tau as DDIM.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar) and lambda = log(alpha / sigma) (the half
    log-SNR), the step from tau_i to tau_{i-1}, h = lambda_{i-1} - lambda_i, is
        x_{tau_{i-1}} = (sigma_{i-1} / sigma_i) x_{tau_i} - alpha_{i-1} (e^{-h} - 1) D_i,
    with D_i the predicted x_0 (eq. (9) of DDIM) at the first step, where it is DDIM's eta = 0
    step, and after it the second-order D_i = x0_i + (x0_i - x0_{i+1}) h / (2 h_prev), h_prev =
    lambda_i - lambda_{i+1} (x0_i extrapolated linearly in lambda to the middle of the step). The
    last step, to sigma = 0, is first order: it returns the predicted x_0 (diffusers'
    `final_sigmas_type="zero"`). Coefficients in float64.

    Returns the samples, or (samples, {t: Recorded(x_t, pred_x0)}) when `record` lists
    timesteps of tau to keep.
    """
    SamplerSettings("dpmpp_2m", steps, spacing=spacing, clip=clip_denoised).validate(len(betas))
    tau = timesteps(len(betas), steps, spacing)
    abar = NoiseSchedule(betas).alphas_cumprod[tau]
    alpha, sigma = abar.sqrt().tolist(), (1 - abar).sqrt().tolist()
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]  # lambda, increasing along tau's reverse
    wanted, recorded = _check_record(record, tau.tolist()), {}
    x, previous_x0 = x_T, None
    for i in reversed(range(len(tau))):
        t = int(tau[i])
        pred_x0 = _pred_x0(x, _call(model, x, t), float(abar[i]))
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        if t in wanted:
            recorded[t] = Recorded(x, pred_x0)
        if i == 0:
            x = pred_x0
            break
        h = lam[i - 1] - lam[i]
        d = pred_x0 if previous_x0 is None else pred_x0 + h / (2 * (lam[i] - lam[i + 1])) * (pred_x0 - previous_x0)
        x = sigma[i - 1] / sigma[i] * x - alpha[i - 1] * math.expm1(-h) * d
        previous_x0 = pred_x0
    return (x, recorded) if record is not None else x


def ddpm_sample(
    model: Model,
    betas: Tensor,
    x_T: Tensor,
    *,
    variance: str = "posterior",
    clip_denoised: bool = False,
    generator: Generators = None,
    record: Iterable[int] | None = None,
    t_start: int | None = None,
) -> Tensor | tuple[Tensor, dict[int, Recorded]]:
    """DDPM ancestral sampling (Algorithm 2) over every timestep from t_start (default T-1) to 0.

    x_{t-1} = mu_theta(x_t, t) + sigma_t z, where mu_theta is DDPM eq. (11), computed as
    the reference implementation does: the posterior mean mu-tilde of eq. (7) at the
    predicted x_0 (identical unless clip_denoised clips that prediction to [-1, 1]).
    sigma_t^2 is beta-tilde_t ("posterior", eq. (7)) or beta_t ("beta"), the two choices of
    DDPM section 3.2. No noise is added at the last step (t=0).

    `t_start` lets the chain start from an intermediate x_t (DDPM interpolation).
    Returns the samples, or (samples, {t: Recorded(x_t, pred_x0)}) when `record` is given.
    """
    SamplerSettings("ddpm", variance=variance, clip=clip_denoised)
    schedule = NoiseSchedule(betas)
    variances = schedule.posterior_variance if variance == "posterior" else schedule.betas
    T = schedule.num_timesteps
    t_start = T - 1 if t_start is None else int(t_start)
    if not 0 <= t_start < T:
        raise ValueError(f"t_start must be in [0, {T - 1}], got {t_start}")
    wanted, recorded = _check_record(record, range(t_start + 1)), {}
    x = x_T
    for t in range(t_start, -1, -1):
        a_t = float(schedule.alphas_cumprod[t])
        eps = _call(model, x, t)
        pred_x0 = _pred_x0(x, eps, a_t)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        if t in wanted:
            recorded[t] = Recorded(x, pred_x0)
        x = float(schedule.posterior_mean_coef_x0[t]) * pred_x0 + float(schedule.posterior_mean_coef_xt[t]) * x
        if t > 0:
            x = x + math.sqrt(float(variances[t])) * randn(x.shape, generator, x.device, x.dtype)
    return (x, recorded) if record is not None else x
