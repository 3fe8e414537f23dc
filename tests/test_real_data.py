"""A short real-data check of the project's own training step: the tiny UNet, trained with
`diffusion.training.train_step` (L_simple, clipping, Adam, EMA) on real CIFAR-10 photographs,
lowers the held-out L_simple of `diffusion.training.HeldoutSet`."""

import pytest
import torch

from diffusion import from_uint8, to_model_input
from diffusion.config import PRESETS
from diffusion.training import HeldoutSet, build_state, train_step


@pytest.mark.slow
def test_the_training_step_lowers_heldout_l_simple_on_real_cifar10(cifar):
    train_u8, _ = cifar("train", per_class=50)  # 500 training images
    heldout_u8, _ = cifar("test", per_class=10)  # 100 held-out images
    config = PRESETS["tiny"].replace(max_steps=120)
    state = build_state(config, torch.device("cpu"))
    heldout = HeldoutSet(from_uint8(heldout_u8), config.num_timesteps, seed=1)

    initial = heldout.loss(state.model, state.schedule, config)
    batches = torch.Generator().manual_seed(2)
    images = train_u8.permute(0, 2, 3, 1)  # uint8 (N, H, W, C), as Ray Data hands them to a worker
    while state.step < config.max_steps:
        idx = torch.randint(0, len(images), (config.batch_size,), generator=batches)
        train_step(state, state.model, to_model_input(images[idx]), config)
    final = heldout.loss(state.model, state.schedule, config)
    final_ema = heldout.loss(state.ema.ema_model, state.schedule, config)
    print(f"held-out L_simple: step 0 {initial:.4f} -> step {state.step} {final:.4f} (EMA {final_ema:.4f})")
    assert initial == pytest.approx(1.0, abs=0.02)  # the zero-initialised output predicts no noise
    assert final < 0.5 * initial and final_ema < initial
