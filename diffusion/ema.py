"""Exponential moving average of model weights (DDPM uses decay 0.9999 for sampling), with the
warm-up of diffusers' EMAModel, so that a short run's EMA is not its first steps' average."""

from __future__ import annotations

import copy

import torch
from torch import nn


def warmup_decay(decay: float, update: int) -> float:
    """The decay of 0-based update n with diffusers' EMAModel warm-up (its `use_ema_warmup=False`
    default): 0 at the first update (the EMA starts as the weights), then min(decay, (1 + n) / (10 + n)),
    which averages over about the last n / 9 updates until `decay` takes over (at n = 8,991 for 0.999)."""
    return 0.0 if update <= 0 else min(decay, (1 + update) / (10 + update))


class EMA:
    """Keeps `ema_model`, a frozen copy of the model whose weights track
    ema = d * ema + (1 - d) * weights, updated with one foreach kernel per step; d is `decay`, or
    with `warmup` its warm-up (`warmup_decay`) at the update's step, so that a resumed run
    continues exactly."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay of the update after `step` training steps."""
        return warmup_decay(self.decay, step) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int = 0) -> None:
        """Move the average towards `model`'s weights after `step` earlier updates (the training step)."""
        ema_params = list(self.ema_model.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA.update got a model with a different set of parameters than it was built from")
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(step))
        for ema_buffer, buffer in zip(self.ema_model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return self.ema_model.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.ema_model.load_state_dict(state_dict)
