"""FID and IS: the Frechet distance against a scipy.linalg.sqrtm reference, exact merging of
feature statistics, FID of a set against itself and under added noise (with a randomly
initialised FID Inception saved as a weights file: NOT the real weights), missing weights."""

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusion.fid import (
    WEIGHTS_FILE,
    FeatureStats,
    InceptionFeatures,
    frechet_distance,
    inception_score,
    inception_weights,
)


def sqrtm_reference(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim", [8, 64, 256])
def test_frechet_distance_matches_the_sqrtm_reference_on_random_gaussians(dim):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(4 * dim, dim)) @ rng.normal(size=(dim, dim)) * 0.3
    b = rng.normal(size=(4 * dim, dim)) * 1.2 + 0.1
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(sqrtm_reference(mu1, s1, mu2, s2), rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6 * np.trace(s1))


def test_feature_stats_merge_exactly_and_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16))
    whole = FeatureStats(16).add(x)
    parts = [FeatureStats(16).add(x[i : i + 70]) for i in range(0, 300, 70)]
    merged = FeatureStats(16)
    for p in parts:
        merged.n, merged.sum, merged.outer = merged.n + p.n, merged.sum + p.sum, merged.outer + p.outer
    assert np.allclose(whole.mu, x.mean(0)) and np.allclose(whole.sigma, np.cov(x, rowvar=False))
    assert np.allclose(merged.sigma, whole.sigma, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(16).add(x[:1]).sigma


def test_inception_score_of_uniform_and_of_confident_distinct_predictions():
    assert inception_score(np.zeros((100, 1008)), splits=5) == pytest.approx((1.0, 0.0))
    confident = np.full((100, 1008), -50.0)
    confident[np.arange(100), np.arange(100) % 10] = 50.0  # 10 classes, equally often
    mean, std = inception_score(confident, splits=5)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6


@pytest.mark.slow
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(random_inception, cifar):
    images = cifar("test", 2)[0].permute(0, 2, 3, 1).numpy()  # 20 real CIFAR-10 test images, uint8 (N, 32, 32, 3)
    net = InceptionFeatures(random_inception)
    pool, logits = net(torch.from_numpy(images))
    assert pool.shape == (20, 2048) and logits.shape == (20, 1008)
    base = FeatureStats().add(pool.numpy())
    fids = []
    rng = np.random.default_rng(0)
    for sigma in (0, 15, 60):
        noisy = np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)
        stats = FeatureStats().add(net(torch.from_numpy(noisy))[0].numpy())
        fids.append(frechet_distance(base.mu, base.sigma, stats.mu, stats.sigma))
    assert np.trace(base.sigma) > 1e-3 and abs(fids[0]) < 1e-5 * np.trace(
        base.sigma
    )  # rank-deficient: 20 vectors in 2048-d
    assert fids == sorted(fids) and fids[1] > 0 and fids[-1] > 2 * fids[1]


def test_missing_weights_say_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        inception_weights(download=False)
    message = str(e.value)
    assert WEIGHTS_FILE in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "--inception-weights" in message
    with pytest.raises(FileNotFoundError, match="nope.pth do not exist"):
        inception_weights(str(tmp_path / "nope.pth"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert inception_weights(download=False) == cached
