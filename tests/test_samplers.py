import math

import numpy as np
import pytest
import torch

from diffusion import (
    NoiseSchedule,
    build_unet,
    ddim_sample,
    ddim_sigmas,
    ddpm_sample,
    fixed_batch,
    make_betas,
    make_generators,
    randn,
    timesteps,
)

MU, S = 0.3, 0.5
N_DRAWS = 8192  # x 4 pixels: standard error of the mean S / 181, of the std S / 256


def draws(n=N_DRAWS, seed=0):
    return torch.randn(n, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps", [1, 10, 20, 30, 50, 100, 1000])
def test_uniform_timesteps_follow_the_ddim_reference(steps):
    tau = timesteps(1000, steps, "uniform")
    assert tau.dtype == torch.long
    assert tau.tolist() == list(range(0, 1000, 1000 // steps))


def test_quadratic_timesteps_are_the_ddim_references_for_every_length():
    """The reference computes (np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(int) in float64:
    at exact squares its last bit decides a timestep (S = 16: 287 and 511, not 288 and 512)."""
    for steps in range(1, 1001):
        seq = (np.linspace(0, np.sqrt(1000 * 0.8), steps) ** 2).astype(int)
        tau = timesteps(1000, steps, "quadratic")
        assert tau.dtype == torch.long
        assert tau.tolist() == sorted(set(seq.tolist())), steps  # ascending, repeats dropped
    assert {287, 511} <= set(timesteps(1000, 16, "quadratic").tolist())


@pytest.mark.parametrize(
    "args, match",
    [
        ((1000, 0, "uniform"), r"steps must be >= 1, got 0"),
        ((1000, 1001, "uniform"), r"steps must be in \[1, 1000\] \(the model's T\), got 1001"),
        ((1000, 10, "log"), "spacing must be one of uniform, quadratic, got 'log'"),
    ],
)
def test_bad_timesteps_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        timesteps(*args)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_eta_one_gives_the_ddpm_posterior_std(name):
    betas = make_betas(name)
    tau = timesteps(1000, 1000)
    sigma = ddim_sigmas(betas, tau, eta=1.0)
    expected = NoiseSchedule(betas).posterior_variance.sqrt()
    assert torch.allclose(sigma, expected, rtol=1e-10, atol=1e-15)
    assert torch.all(ddim_sigmas(betas, tau, eta=0.0) == 0)


def test_sigma_uses_the_previous_step_of_the_subsequence_itself():
    betas = make_betas("linear")
    tau = timesteps(1000, 10, "quadratic")  # uneven gaps: a fixed stride would be wrong
    abar = NoiseSchedule(betas).alphas_cumprod
    i = 5
    a_t, a_prev = abar[tau[i]], abar[tau[i - 1]]
    expected = ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    assert ddim_sigmas(betas, tau, 1.0)[i].item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("sampler", ["ddpm-posterior", "ddpm-beta", "ddim-1000"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samplers_recover_the_data_distribution(oracle, sampler, schedule):
    betas = make_betas(schedule)
    model = oracle(betas, MU, S)
    x_T = draws()
    if sampler == "ddim-1000":
        x0 = ddim_sample(model, betas, x_T, steps=1000, eta=0.0)
    else:
        x0 = ddpm_sample(model, betas, x_T, variance=sampler.split("-")[1], generator=torch.Generator().manual_seed(1))
    tolerance = 0.015  # about 5 standard errors at this sample size, plus discretisation bias
    assert x0.mean().item() == pytest.approx(MU, abs=tolerance)
    assert x0.std().item() == pytest.approx(S, abs=tolerance)


def ddim_linear_map(betas, tau, mu, s):
    """For the Gaussian oracle, each eta=0 DDIM step is affine in x: compose them in float64."""
    abar = NoiseSchedule(betas).alphas_cumprod.tolist()
    a_slope, a_offset = 1.0, 0.0
    for i in reversed(range(len(tau))):
        a = abar[tau[i]]
        c = math.sqrt(1 - a) / (a * s * s + 1 - a)
        eps_slope, eps_offset = c, -c * math.sqrt(a) * mu
        x0_slope = (1 - math.sqrt(1 - a) * eps_slope) / math.sqrt(a)
        x0_offset = -math.sqrt(1 - a) * eps_offset / math.sqrt(a)
        if i == 0:
            step_slope, step_offset = x0_slope, x0_offset
        else:
            p = abar[tau[i - 1]]
            step_slope = math.sqrt(p) * x0_slope + math.sqrt(1 - p) * eps_slope
            step_offset = math.sqrt(p) * x0_offset + math.sqrt(1 - p) * eps_offset
        a_slope, a_offset = step_slope * a_slope, step_slope * a_offset + step_offset
    return a_slope, a_offset


@pytest.mark.parametrize("steps, spacing", [(10, "uniform"), (10, "quadratic"), (50, "uniform"), (100, "quadratic")])
def test_ddim_with_fewer_steps_is_the_exact_linear_map(oracle, steps, spacing):
    betas = make_betas("linear")
    x_T = draws(64)
    got = ddim_sample(oracle(betas, MU, S), betas, x_T, steps=steps, eta=0.0, spacing=spacing)
    slope, offset = ddim_linear_map(betas, timesteps(1000, steps, spacing).tolist(), MU, S)
    assert torch.allclose(got, slope * x_T + offset, rtol=1e-10, atol=1e-12)


def test_ddim_last_step_returns_the_predicted_x0_without_noise(oracle):
    betas = make_betas("linear")
    x, rec = ddim_sample(
        oracle(betas, MU, S),
        betas,
        draws(16),
        steps=20,
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
        record=[0],
    )
    assert torch.equal(x, rec[0].pred_x0)


def test_ddpm_last_step_adds_no_noise(oracle):
    betas = make_betas("linear")
    model = oracle(betas, MU, S)
    x_T = draws(16)
    a = ddpm_sample(model, betas, x_T, generator=torch.Generator().manual_seed(0), record=[0])
    b = ddpm_sample(model, betas, x_T, generator=torch.Generator().manual_seed(0), record=[0])
    assert torch.equal(a[0], b[0])
    assert torch.allclose(a[0], a[1][0].pred_x0, rtol=0, atol=1e-10)  # mu-tilde at t=0 is x_0


def test_record_returns_the_trajectory(oracle):
    betas = make_betas("linear")
    x_T = draws(8)
    x0, rec = ddpm_sample(
        oracle(betas, MU, S), betas, x_T, record=[999, 500, 0], generator=torch.Generator().manual_seed(0)
    )
    assert sorted(rec) == [0, 500, 999]
    assert torch.equal(rec[999].x_t, x_T)
    assert rec[500].x_t.shape == x_T.shape and rec[500].pred_x0.shape == x_T.shape
    x0, rec = ddim_sample(oracle(betas, MU, S), betas, x_T, steps=10, record=[900, 0])
    assert sorted(rec) == [0, 900] and torch.equal(x0, rec[0].pred_x0)
    with pytest.raises(ValueError, match=r"record asks for timesteps \[999\]"):
        ddim_sample(oracle(betas, MU, S), betas, x_T, steps=10, record=[999])


def test_clip_denoised_keeps_predictions_in_range(oracle):
    betas = make_betas("linear")
    model = oracle(betas, 0.0, 3.0)  # data far outside [-1, 1]
    x_T = draws(32)
    for x0, rec in [
        ddim_sample(model, betas, x_T, steps=20, clip_denoised=True, record=[500]),
        ddpm_sample(model, betas, x_T, clip_denoised=True, record=[500], generator=torch.Generator().manual_seed(0)),
    ]:
        assert rec[500].pred_x0.abs().max() <= 1
        assert x0.abs().max() <= 1 + 1e-6


def per_seed(sample_fn, seeds, shape=(1, 2, 2), dtype=torch.float64):
    gens = make_generators(seeds)
    return sample_fn(randn((len(seeds), *shape), gens, dtype=dtype), gens)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim-eta1"])
def test_per_seed_samples_do_not_depend_on_the_batch(oracle, sampler):
    betas = make_betas("linear")
    model = oracle(betas, MU, S)
    fn = {
        "ddpm": lambda x, g: ddpm_sample(model, betas, x, generator=g),
        "ddim-eta1": lambda x, g: ddim_sample(model, betas, x, steps=50, eta=1.0, generator=g),
    }[sampler]
    seeds = [11, 12, 13, 14, 15]
    batched = per_seed(fn, seeds)
    for i, seed in enumerate(seeds):
        assert torch.equal(per_seed(fn, [seed])[0], batched[i])
    assert torch.equal(per_seed(fn, seeds[2:4]), batched[2:4])


def test_unet_samples_are_bit_identical_alone_or_batched_with_fixed_batch():
    torch.manual_seed(0)
    unet = build_unet("tiny").eval()
    with torch.no_grad():
        for p in unet.parameters():  # leave the zero initialisation: a non-trivial network
            p.add_(0.02 * torch.randn_like(p))
    model = fixed_batch(unet, 4)
    betas = make_betas("linear", num_timesteps=40, beta_end=0.3)  # a short chain keeps DDPM fast
    fns = [
        lambda x, g: ddim_sample(model, betas, x, steps=5, eta=0.5, generator=g),
        lambda x, g: ddpm_sample(model, betas, x, generator=g),
    ]
    seeds = [3, 1, 4, 1, 5, 9]
    with torch.no_grad():
        for fn in fns:
            batched = per_seed(fn, seeds, (3, 32, 32), torch.float32)
            assert batched.std() > 0.1
            for i in (0, 2, 5):
                assert torch.equal(per_seed(fn, [seeds[i]], (3, 32, 32), torch.float32)[0], batched[i])


def test_fixed_batch_splits_and_pads():
    calls = []

    def model(x, t):
        calls.append(x.shape[0])
        return x * 2

    x = torch.randn(7, 1, 2, 2)
    out = fixed_batch(model, 3)(x, torch.zeros(7, dtype=torch.long))
    assert calls == [3, 3, 3] and torch.equal(out, x * 2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        fixed_batch(model, 0)


def test_sigma_hat_over_all_steps_is_ddpm_with_beta_variance(oracle):
    """DDIM Table 1's last row: eta = 1's mean with noise sigma-hat = sqrt(1 - abar_t / abar_prev).
    Over every timestep that is DDPM ancestral sampling with sigma_t^2 = beta_t, noise for noise."""
    betas = make_betas("linear", 100)
    model = oracle(betas, MU, S)
    x_T = draws(16)
    hat = ddim_sample(model, betas, x_T, steps=100, eta=1.0, variance="beta", generator=make_generators(range(16)))
    ddpm = ddpm_sample(model, betas, x_T, variance="beta", generator=make_generators(range(16)))
    torch.testing.assert_close(hat, ddpm, atol=1e-10, rtol=0)
    eta_one = ddim_sample(model, betas, x_T, steps=100, eta=1.0, generator=make_generators(range(16)))
    assert not torch.allclose(hat, eta_one)  # the posterior std is the smaller one


def test_sigma_hat_on_a_subsequence_has_the_larger_noise(oracle):
    betas = make_betas("linear")
    tau = timesteps(1000, 10)
    abar = NoiseSchedule(betas).alphas_cumprod[tau]
    hat = (1 - abar[1:] / abar[:-1]).sqrt()
    assert (hat > ddim_sigmas(betas, tau, 1.0)[1:]).all()
    model = oracle(betas, MU, S)
    x = ddim_sample(
        model, betas, draws(), steps=10, eta=1.0, variance="beta", generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(x).all()


def test_bad_sampler_arguments_are_named(oracle):
    betas = make_betas("linear")
    model = oracle(betas, MU, S)
    x_T = draws(4)
    for eta in (-0.1, 1.5):  # eq. (16) spans eta in [0, 1]; beyond 1 the step's square root goes negative
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            ddim_sample(model, betas, x_T, steps=10, eta=eta)
    with pytest.raises(
        ValueError, match="variance beta with DDIM is the paper's sigma-hat, defined for eta = 1, got eta 0.5"
    ):
        ddim_sample(model, betas, x_T, steps=10, eta=0.5, variance="beta")
    with pytest.raises(ValueError, match="variance must be one of posterior, beta, got 'fixed'"):
        ddpm_sample(model, betas, x_T, variance="fixed")
    with pytest.raises(ValueError, match=r"t_start must be in \[0, 999\]"):
        ddpm_sample(model, betas, x_T, t_start=1000)
    with pytest.raises(ValueError, match="got 3 generators for a batch of 4"):
        ddpm_sample(model, betas, x_T, generator=make_generators([1, 2, 3]))
