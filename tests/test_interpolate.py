import math

import pytest
import torch

from diffusion import (
    ddim_interpolate,
    ddim_interpolate_images,
    ddim_invert,
    ddim_sample,
    ddpm_interpolate,
    make_betas,
    slerp,
)

MU, S = 0.3, 0.5


def test_slerp_keeps_the_norm_of_gaussian_noise():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(16, 3, 32, 32, generator=g), torch.randn(16, 3, 32, 32, generator=g)
    expected = math.sqrt(3 * 32 * 32)
    for lam in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        norms = slerp(z0, z1, lam).flatten(1).norm(dim=1)
        assert torch.allclose(norms, torch.full_like(norms, expected), rtol=0.05)
    lerp_norms = (0.5 * z0 + 0.5 * z1).flatten(1).norm(dim=1)
    assert lerp_norms.max() < 0.8 * expected  # what slerp avoids


def test_slerp_endpoints_and_equal_norm_inputs():
    g = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    z1 = z1 / z1.norm(dim=1, keepdim=True) * z0.norm(dim=1, keepdim=True)
    assert torch.allclose(slerp(z0, z1, 0.0), z0) and torch.allclose(slerp(z0, z1, 1.0), z1)
    for lam in (0.3, 0.7):  # equal-norm inputs: the norm is kept exactly
        assert torch.allclose(slerp(z0, z1, lam).norm(dim=1), z0.norm(dim=1), rtol=1e-12)
    parallel = slerp(z0, 2 * z0, 0.5)  # angle 0 falls back to a linear interpolation
    assert torch.allclose(parallel, 1.5 * z0)
    with pytest.raises(ValueError, match="slerp needs two tensors of one shape"):
        slerp(z0, z1[:, :4], 0.5)


def test_ddim_inversion_then_decoding_returns_the_input(oracle):
    betas = make_betas("linear")
    model = oracle(betas, MU, S)
    x0 = MU + S * torch.randn(256, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for steps in (100, 1000):
        z = ddim_invert(model, betas, x0, steps=steps)
        assert z.std().item() == pytest.approx(1.0, abs=0.1)  # the latent looks like N(0, I)
        errors[steps] = (ddim_sample(model, betas, z, steps=steps) - x0).abs().max().item()
    assert errors[1000] < 0.01 and errors[1000] < errors[100] / 5


def test_ddim_interpolation_decodes_slerped_noise(oracle):
    betas = make_betas("linear")
    model = oracle(betas, MU, S)
    g = torch.Generator().manual_seed(2)
    z0, z1 = torch.randn(1, 2, 2, generator=g), torch.randn(1, 2, 2, generator=g)
    out = ddim_interpolate(model, betas, z0, z1, [0.0, 0.5, 1.0], steps=20)
    assert out.shape == (3, 1, 2, 2)
    assert torch.allclose(out[0], ddim_sample(model, betas, z0[None], steps=20)[0], atol=1e-6)
    assert torch.allclose(out[2], ddim_sample(model, betas, z1[None], steps=20)[0], atol=1e-6)
    assert torch.allclose(out[1], ddim_sample(model, betas, slerp(z0[None], z1[None], 0.5), steps=20)[0], atol=1e-6)


def test_ddim_interpolation_of_real_images_goes_through_inversion(oracle):
    betas = make_betas("linear")
    model = oracle(betas, MU, S)
    g = torch.Generator().manual_seed(3)
    a, b = (MU + S * torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64)).unbind(0)
    out = ddim_interpolate_images(model, betas, a, b, [0.0, 1.0], steps=1000)
    assert torch.allclose(out[0], a, atol=0.02) and torch.allclose(out[1], b, atol=0.02)


def test_ddpm_interpolation_shares_the_reverse_noise_across_lambdas(oracle):
    betas = make_betas("linear")
    model = oracle(betas, MU, S)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(1, 4, 4, generator=g), torch.randn(1, 4, 4, generator=g)
    out = ddpm_interpolate(model, betas, a, b, t=250, lambdas=[0.0, 0.3, 0.3, 1.0], seed=7)
    assert out.shape == (4, 1, 4, 4)
    assert torch.equal(out[1], out[2])  # same lambda, same noise: the rows differ only by lambda
    assert not torch.equal(out[0], out[3])
    again = ddpm_interpolate(model, betas, a, b, t=250, lambdas=[0.0, 0.3, 0.3, 1.0], seed=7)
    assert torch.equal(out, again)


def test_ddpm_interpolation_from_a_small_t_stays_near_the_endpoints(oracle):
    betas = make_betas("linear")
    model = oracle(betas, 0.0, 1.0)  # N(0, I) data: the oracle barely shrinks x_0 at small t
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(1, 8, 8, generator=g), torch.randn(1, 8, 8, generator=g)
    out = ddpm_interpolate(model, betas, a, b, t=5, lambdas=[0.0, 1.0])
    # Forward and reverse noise at t=5 have a std of about 0.03 each.
    assert (out[0] - a[0]).abs().mean() < 0.06 and (out[1] - b[0]).abs().mean() < 0.06
    assert (out[0] - b[0]).abs().mean() > 0.5
    with pytest.raises(ValueError, match=r"t must be a 0-based timestep in \[0, 999\]"):
        ddpm_interpolate(model, betas, a, b, t=1000, lambdas=[0.5])
    with pytest.raises(ValueError, match=r"x0_b must be one image"):
        ddpm_interpolate(model, betas, a, torch.randn(2, 1, 8, 8), t=5, lambdas=[0.5])
