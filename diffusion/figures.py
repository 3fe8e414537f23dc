"""The papers' figures from a `Sampler`: DDIM consistency over tau (DDIM fig. 5), DDIM slerp
interpolation (DDIM fig. 6), DDPM interpolation (DDPM fig. 8) and DDPM diffusion sequences of
x_t and the predicted x_0 (DDPM figs. 6-7)."""

from __future__ import annotations

import numpy as np
import torch

from .config import SamplerSettings
from .sampling import Sampler

CONSISTENCY_STEPS = (10, 20, 50, 100, 1000)
INTERPOLATION_FRACTIONS = (0.1, 0.25)  # DDPM interpolation from t = T/10 and T/4 (100 and 250 for T = 1000)


def figures(sampler: Sampler, seeds: list[int]) -> dict[str, tuple[torch.Tensor, int]]:
    """The figures as {name: (images in [-1, 1], images per row)}, from `seeds` (an even count)."""
    out = {}
    T = sampler.num_timesteps
    steps = [s for s in CONSISTENCY_STEPS if s <= T]
    rows = [sampler.samples(seeds, SamplerSettings("ddim", s)) for s in steps]
    out[f"consistency_tau_{'_'.join(map(str, steps))}"] = torch.cat(rows), len(seeds)
    lambdas = np.linspace(0, 1, 10).tolist()
    pairs = list(zip(seeds[0::2], seeds[1::2]))
    out["ddim_slerp_interpolation"] = (
        torch.cat([sampler.ddim_interpolation(a, b, lambdas, min(50, T), "uniform") for a, b in pairs]),
        len(lambdas),
    )
    ends = sampler.samples([s for pair in pairs for s in pair], SamplerSettings("ddim", min(50, T)))
    for fraction in INTERPOLATION_FRACTIONS:
        t = round(fraction * T)  # the paper's t is the 0-based index t - 1
        grids = [
            sampler.ddpm_interpolation(ends[2 * i], ends[2 * i + 1], t - 1, lambdas, seed=i) for i in range(len(pairs))
        ]
        out[f"ddpm_interpolation_t{t}"] = torch.cat(grids), len(lambdas)
    record, x_t, pred_x0 = sampler.sequences(seeds[:4], SamplerSettings("ddpm"), count=10)
    out["ddpm_sequence_x_t"] = x_t, len(record)
    out["ddpm_sequence_pred_x0"] = pred_x0, len(record)
    return out
