"""DPM-Solver++(2M) (`dpm_solver_sample`): step for step diffusers' DPMSolverMultistepScheduler
(algorithm dpmsolver++, order 2, midpoint, final sigma 0) in float64 on the same network and
noise; second-order convergence to the exact probability-flow ODE solution of Gaussian data,
where DDIM (its first-order special case) converges at first order; one image a seed."""

import math
import types

import pytest
import torch

from diffusion import (
    NoiseSchedule,
    Pipeline,
    SamplerSettings,
    build_unet,
    ddim_sample,
    dpm_solver_sample,
    fixed_batch,
    make_betas,
    make_generators,
    randn,
    timesteps,
)
from diffusion.errors import OptionError
from diffusion.figures import Plan, figures
from diffusion.pipeline import steps_of

MU, S = 0.3, 0.5


def draws(n: int, shape=(1, 2, 2), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def small_unet() -> torch.nn.Module:
    """The tiny UNet in float64 with its zero-initialised layers perturbed: a non-trivial network."""
    torch.manual_seed(0)
    unet = build_unet("tiny").double().eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet


def diffusers_dpm_solver(model, betas: torch.Tensor, x_T: torch.Tensor, tau: torch.Tensor, monkeypatch):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2) over `tau`, in float64: its
    schedule recomputed in float64 from the same betas, and the float32 it casts each step's
    sample to (for half-precision pipelines) made float64."""
    import diffusers.schedulers.scheduling_dpmsolver_multistep as module

    monkeypatch.setattr(module, "torch", types.SimpleNamespace(**{**vars(torch), "float32": torch.float64}))
    scheduler = module.DPMSolverMultistepScheduler(
        num_train_timesteps=len(betas),
        trained_betas=betas.tolist(),
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(timesteps=tau.flip(0).tolist())
    abar = NoiseSchedule(betas).alphas_cumprod  # float64, as ours
    scheduler.alphas_cumprod = abar
    scheduler.sigmas = torch.cat(
        [((1 - abar[tau.flip(0)]) / abar[tau.flip(0)]).sqrt(), torch.zeros(1, dtype=abar.dtype)]
    )
    x = x_T
    for t in scheduler.timesteps:
        eps = model(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
        x = scheduler.step(eps, t, x).prev_sample
    return x


def assert_as_diffusers(model, betas: torch.Tensor, x_T: torch.Tensor, steps: int, spacing: str, monkeypatch):
    with torch.no_grad():
        ours = dpm_solver_sample(model, betas, x_T, steps=steps, spacing=spacing)
        theirs = diffusers_dpm_solver(model, betas, x_T, timesteps(len(betas), steps, spacing), monkeypatch)
    assert ours.dtype == torch.float64 and ours.std() > 0.05  # not a constant
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10 * max(1.0, theirs.abs().max().item()))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps, spacing", [(1, "uniform"), (2, "uniform"), (10, "uniform"), (20, "quadratic")])
def test_each_step_is_diffusers_dpm_solver_plus_plus_2m_in_float64(oracle, monkeypatch, schedule, steps, spacing):
    betas = make_betas(schedule)
    assert_as_diffusers(oracle(betas, MU, S), betas, draws(16), steps, spacing, monkeypatch)


def test_on_a_unet_too(monkeypatch):
    betas = make_betas("linear", 100)
    assert_as_diffusers(small_unet(), betas, draws(1, (3, 32, 32)), 6, "quadratic", monkeypatch)


def exact_ode_sample(betas: torch.Tensor, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """For data N(MU, S^2), the probability-flow ODE keeps (x_t - sqrt(abar) MU) / sqrt(abar S^2 +
    1 - abar) constant: its exact solution from tau's last timestep to its first, then the same
    last step as the samplers' (the predicted x_0 there, E[x_0 | x_t])."""
    abar = NoiseSchedule(betas).alphas_cumprod
    a_top, a_0 = float(abar[tau[-1]]), float(abar[tau[0]])

    def var(a: float) -> float:  # of x_t
        return a * S * S + 1 - a

    x_0 = math.sqrt(a_0) * MU + math.sqrt(var(a_0) / var(a_top)) * (x - math.sqrt(a_top) * MU)
    return MU + math.sqrt(a_0) * S * S / var(a_0) * (x_0 - math.sqrt(a_0) * MU)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_error_falls_at_second_order_as_steps_double_where_ddim_falls_at_first(oracle, schedule):
    """Measured (quadratic tau, 256 draws): each doubling from 20 to 80 steps divides DPM-Solver++'s
    largest error by 4.5-5.5 (second order: 4), DDIM's by 2.0 (first order: 2)."""
    betas = make_betas(schedule)
    model, x_T = oracle(betas, MU, S), draws(256)
    errors = {"dpm": [], "ddim": []}
    for steps in (20, 40, 80):
        exact = exact_ode_sample(betas, x_T, timesteps(1000, steps, "quadratic"))
        got = {
            "dpm": dpm_solver_sample(model, betas, x_T, steps=steps, spacing="quadratic"),
            "ddim": ddim_sample(model, betas, x_T, steps=steps, spacing="quadratic"),
        }
        for name, x in got.items():
            errors[name].append((x - exact).abs().max().item())
    for name, (e20, e40, e80) in errors.items():
        orders = math.log2(e20 / e40), math.log2(e40 / e80)
        if name == "dpm":
            assert all(order > 1.8 for order in orders), errors
            assert e80 < errors["ddim"][2] / 10, errors
        else:
            assert all(0.9 < order < 1.2 for order in orders), errors


def test_a_fixed_seed_image_differs_from_ddims_by_more_than_rounding_and_is_the_same_alone_or_batched():
    unet = small_unet().float()
    betas = make_betas("linear", num_timesteps=40, beta_end=0.3)
    model = fixed_batch(unet, 2)
    seeds = [3, 1, 4]

    def sample(sampler, some_seeds):
        x_T = randn((len(some_seeds), 3, 32, 32), make_generators(some_seeds))
        with torch.no_grad():
            return sampler(model, betas, x_T, steps=4)

    batched = sample(dpm_solver_sample, seeds)
    for i in (0, 2):
        assert torch.equal(sample(dpm_solver_sample, [seeds[i]])[0], batched[i])
    assert (batched - sample(ddim_sample, seeds)).abs().max() > 1e-2


def test_the_pipeline_samples_with_it_and_counts_its_calls():
    unet = small_unet().float()
    betas = make_betas("linear", num_timesteps=100)
    pipeline = Pipeline(unet, betas, batch_size=2)
    settings = SamplerSettings("dpmpp_2m", 7, spacing="quadratic")
    calls = []
    with pipeline.observed(lambda: calls.append(1)):
        images = pipeline.samples([0, 1], settings)
    assert len(calls) == steps_of(settings, 100) == len(timesteps(100, 7, "quadratic"))
    x_T, _ = pipeline.noise([0, 1])
    with torch.no_grad():
        expected = dpm_solver_sample(pipeline.batched, betas, x_T, steps=7, spacing="quadratic")
    assert torch.equal(images, expected)
    assert settings.label(100) == "dpmpp_2m-7-quadratic" and SamplerSettings("dpmpp_2m").steps == 20
    record, frames, _ = pipeline.sequences([0], SamplerSettings("dpmpp_2m", 5), count=3)
    assert record == [80, 40, 0] and frames.shape == (3, 3, 32, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eta": 0.5}, "DPM-Solver\\+\\+\\(2M\\) is deterministic .* it takes no eta and no variance"),
        ({"variance": "beta"}, "DPM-Solver\\+\\+\\(2M\\) is deterministic"),
    ],
)
def test_eta_and_variance_are_refused_in_one_sentence(kwargs, message):
    with pytest.raises(OptionError, match=message):
        SamplerSettings("dpmpp_2m", 10, **kwargs)


def test_more_steps_than_the_model_has_are_named(oracle):
    betas = make_betas("linear", 100)
    with pytest.raises(OptionError, match=r"steps must be in \[1, 100\] \(the model's T\), got 101"):
        dpm_solver_sample(oracle(betas, MU, S), betas, draws(2), steps=101)


def test_the_consistency_figure_decodes_with_it_when_it_is_the_sampler():
    torch.manual_seed(0)
    digits = build_unet("digits").eval()
    pipeline = Pipeline(digits, make_betas("linear", num_timesteps=100), batch_size=9)
    plan = Plan.of(SamplerSettings("dpmpp_2m", 5), 100, (0, 1), real_pair=False, full=False)
    assert plan.solver == "dpmpp_2m" and plan.describe().startswith("DPM-Solver++(2M) S=10,20,50,100;")
    assert Plan.of(SamplerSettings("ddpm"), 100, (0, 1), False, False).solver == "ddim"
    figure = next(figures(pipeline, plan))
    assert figure.name == "ddim_consistency" and "DPM-Solver++(2M) with S steps" in figure.title
    expected = torch.cat([pipeline.samples([0, 1], SamplerSettings("dpmpp_2m", s)) for s in (10, 20, 50, 100)])
    assert torch.equal(figure.images, expected)
