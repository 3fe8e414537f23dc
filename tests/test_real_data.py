"""A short real-data check: the tiny UNet learns from real CIFAR-10 photographs."""

import pytest
import torch

from diffusion import EMA, NoiseSchedule, build_unet, from_uint8, l_simple, make_betas


@pytest.mark.slow
def test_tiny_unet_lowers_heldout_l_simple_on_real_cifar10(cifar):
    train_u8, _ = cifar("train", per_class=100)  # 1,000 training images
    heldout_u8, _ = cifar("test", per_class=20)  # 200 held-out images
    assert train_u8.shape == (1000, 3, 32, 32) and heldout_u8.shape == (200, 3, 32, 32)
    train, heldout = from_uint8(train_u8), from_uint8(heldout_u8)

    torch.manual_seed(0)
    schedule = NoiseSchedule(make_betas("linear"))
    g = torch.Generator().manual_seed(1)  # a fixed set of (image, t, noise) for the held-out loss
    heldout_t = torch.randint(0, 1000, (len(heldout),), generator=g)
    heldout_noise = torch.randn(heldout.shape, generator=g)
    model = build_unet("tiny")
    ema = EMA(model, decay=0.99)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def heldout_loss(net):
        net.eval()
        with torch.no_grad():
            return l_simple(net, schedule, heldout, heldout_t, heldout_noise).item()

    initial = heldout_loss(model)
    batch_gen = torch.Generator().manual_seed(2)
    for _ in range(200):
        model.train()
        idx = torch.randint(0, len(train), (16,), generator=batch_gen)
        x0 = train[idx]
        x0 = torch.where(torch.rand(16, 1, 1, 1, generator=batch_gen) < 0.5, x0.flip(3), x0)  # random flip
        loss = l_simple(model, schedule, x0, generator=batch_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model)
    final, final_ema = heldout_loss(model), heldout_loss(ema.ema_model)
    print(f"held-out L_simple: step 0 {initial:.4f} -> step 200 {final:.4f} (EMA {final_ema:.4f})")
    assert initial == pytest.approx(1.0, abs=0.02)  # the zero-initialised output predicts no noise
    assert final < 0.5 * initial and final_ema < initial
