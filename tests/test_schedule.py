import math

import pytest
import torch

from diffusion import NoiseSchedule, l_simple, make_betas


def test_linear_schedule_is_the_papers():
    betas = make_betas("linear")
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    diffs = betas.diff()
    assert torch.allclose(diffs, torch.full_like(diffs, (0.02 - 1e-4) / 999), rtol=0, atol=1e-15)


def test_cosine_schedule_follows_nichol_dhariwal_and_clips_at_0_999():
    T, s = 1000, 0.008
    betas = make_betas("cosine", T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert betas.max().item() == pytest.approx(0.999) and betas[-1].item() == pytest.approx(0.999)
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    abar = NoiseSchedule(betas).alphas_cumprod
    unclipped = int((betas < 0.999).sum())  # only the very last steps reach the clip
    assert unclipped >= T - 2
    expected = torch.tensor([f[t + 1] / f[0] for t in range(unclipped)], dtype=torch.float64)
    assert torch.allclose(abar[:unclipped], expected, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "sigmoid"}, "unknown beta schedule 'sigmoid'.*linear, cosine"),
        ({"name": "linear", "beta_start": 0.1, "beta_end": 0.01}, "beta_start <= beta_end"),
        ({"name": "linear", "num_timesteps": 0}, "num_timesteps must be >= 1"),
    ],
)
def test_bad_schedules_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_betas(**kwargs)


def test_noise_schedule_rejects_betas_outside_unit_interval():
    with pytest.raises(ValueError, match=r"every beta must lie in \(0, 1\)"):
        NoiseSchedule(torch.tensor([0.1, 1.0]))


def test_q_sample_is_the_marginal_of_the_markov_chain():
    """Eq. (4) agrees with running q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t) step by step."""
    sched = NoiseSchedule(make_betas("linear"))
    torch.manual_seed(0)
    x0 = torch.full((20000,), 0.7, dtype=torch.float64)
    x = x0.clone()
    for t in range(300):
        x = (1 - sched.betas[t]).sqrt() * x + sched.betas[t].sqrt() * torch.randn_like(x)
    t = torch.full((20000,), 299)
    closed = sched.q_sample(x0, t, torch.randn_like(x0))
    abar = sched.alphas_cumprod[299]
    for sample in (x, closed):
        assert sample.mean().item() == pytest.approx((abar.sqrt() * 0.7).item(), abs=0.02)
        assert sample.var().item() == pytest.approx((1 - abar).item(), rel=0.03)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(name):
    """q(x_{t-1} | x_t, x_0) from Gaussian conditioning equals eqs. (6)-(7)."""
    sched = NoiseSchedule(make_betas(name))
    torch.manual_seed(1)
    t = torch.tensor([1, 2, 50, 500, 998, 999])
    x0, x_t = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    abar_prev, alpha, beta = sched.alphas_cumprod[t - 1], sched.alphas[t], sched.betas[t]
    precision = 1 / (1 - abar_prev) + alpha / beta
    var = 1 / precision
    mean = var * (abar_prev.sqrt() * x0 / (1 - abar_prev) + alpha.sqrt() * x_t / beta)
    got_mean, got_var = sched.q_posterior(x0, x_t, t)
    assert torch.allclose(got_mean, mean, rtol=1e-9) and torch.allclose(got_var, var, rtol=1e-9)
    # At index 0 (the paper's t=1) the posterior is a point mass at x_0.
    mean0, var0 = sched.q_posterior(x0, x_t, torch.zeros(6, dtype=torch.long))
    assert torch.allclose(mean0, x0, atol=1e-12) and torch.all(var0 == 0)


def test_l_simple_with_fixed_t_and_noise_is_deterministic_and_correct():
    sched = NoiseSchedule(make_betas("linear"))
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t, noise = torch.tensor([0, 10, 500, 999]), torch.randn(4, 3, 8, 8)
    model = lambda x, t: 0.5 * x  # noqa: E731
    expected = torch.mean((noise - 0.5 * sched.q_sample(x0, t, noise)) ** 2)
    assert l_simple(model, sched, x0, t, noise).item() == pytest.approx(expected.item(), rel=1e-6)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert l_simple(model, sched, x0, generator=g1).item() == l_simple(model, sched, x0, generator=g2).item()


def test_l_simple_of_the_optimal_predictor_is_its_residual_variance(oracle):
    """For x_0 ~ N(mu, s^2), E||eps - E[eps|x_t]||^2 = 1 - (1 - abar)/(abar s^2 + 1 - abar), averaged over t."""
    betas, mu, s = make_betas("linear"), 0.3, 0.5
    sched, model = NoiseSchedule(betas), oracle(betas, mu, s)
    torch.manual_seed(0)
    x0 = mu + s * torch.randn(50000, 1, 2, 2, dtype=torch.float64)
    abar = sched.alphas_cumprod
    expected = (1 - (1 - abar) / (abar * s**2 + 1 - abar)).mean().item()
    assert l_simple(model, sched, x0).item() == pytest.approx(expected, rel=0.03)
    assert l_simple(lambda x, t: torch.zeros_like(x), sched, x0).item() == pytest.approx(1.0, rel=0.01)
