"""The papers' figures from a `Sampler`, as labelled PNGs:

    ddim_consistency       DDIM fig. 5: one x_T per column, DDIM with S steps of tau per row
    ddim_interpolation     DDIM fig. 6: slerp of two x_T by lambda (columns), decoded with DDIM
    ddpm_interpolation     DDPM fig. 8: two images noised to t (rows), mixed by lambda (columns),
                           denoised by the reverse process; real images when given
    ddpm_sequence          DDPM figs. 6-7: x_t and the predicted x_0 along one reverse chain,
                           at the timesteps t of the columns

Timesteps in labels are the papers' (1-based: t = T is pure noise); the code's 0-based index
is t - 1. `jobs/generate.py --figures` and the batch job write the same files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from .config import SamplerSettings
from .images import from_uint8, to_uint8
from .sampling import Sampler

CONSISTENCY_STEPS = (10, 20, 50, 100, 1000)  # S of DDIM fig. 5, those <= T
INTERPOLATION_FRACTIONS = (0.1, 0.25, 0.5)  # DDPM interpolation from t = T/10, T/4, T/2
LAMBDAS = 9  # evenly spaced in [0, 1]


def batch_size(figure_seeds: int) -> int:
    """The model batch that fits every figure's calls (the seeds, or the lambdas) without padding."""
    return max(figure_seeds, LAMBDAS)


@dataclass
class Figure:
    """A grid of images (rows x cols, row-major, (N, C, H, W) in [-1, 1]) with its labels."""

    name: str
    title: str
    images: Tensor
    row_labels: list[str]
    col_labels: list[str]

    def render(self, min_tile: int = 72):
        """The figure as a PIL image: the title, column labels above, row labels left, each
        image scaled up (nearest) to at least `min_tile` pixels so that labels fit."""
        from PIL import Image, ImageDraw, ImageFont

        rows, cols = len(self.row_labels), len(self.col_labels)
        if len(self.images) != rows * cols:
            raise ValueError(f"{self.name}: {len(self.images)} images for {rows} x {cols} labels")
        tiles = to_uint8(self.images).permute(0, 2, 3, 1).cpu().numpy()
        scale = max(1, math.ceil(min_tile / tiles.shape[1]))
        tile_h, tile_w = tiles.shape[1] * scale, tiles.shape[2] * scale
        font = ImageFont.load_default(size=11)
        gap, line = 2, 16
        left = int(max(font.getlength(label) for label in self.row_labels)) + 8
        top = 2 * line + 6
        width = max(left + cols * (tile_w + gap), int(font.getlength(self.title)) + 8)
        canvas = Image.new("RGB", (width, top + rows * (tile_h + gap)), "white")
        draw = ImageDraw.Draw(canvas)
        draw.text((4, 3), self.title, fill="black", font=font)
        for c, label in enumerate(self.col_labels):
            x = left + c * (tile_w + gap) + (tile_w - font.getlength(label)) / 2
            draw.text((x, line + 4), label, fill="black", font=font)
        for r, label in enumerate(self.row_labels):
            y = top + r * (tile_h + gap)
            draw.text((4, y + tile_h / 2 - 6), label, fill="black", font=font)
            for c in range(cols):
                tile = Image.fromarray(tiles[r * cols + c].squeeze()).resize((tile_w, tile_h), Image.NEAREST)
                canvas.paste(tile, (left + c * (tile_w + gap), y))
        return canvas

    def save(self, where: str | Path | BinaryIO) -> None:
        self.render().save(where, format="PNG")


def figures(sampler: Sampler, seeds: list[int], pair: np.ndarray | None = None) -> list[Figure]:
    """The four figures from `seeds` (an even count, at least 2). `pair`: two real images,
    uint8 (2, H, W, C), for the DDPM interpolation, else two DDIM samples of the first seeds."""
    T = sampler.num_timesteps
    lambdas = np.linspace(0, 1, LAMBDAS).tolist()
    lambda_labels = [f"lambda {lam:.2f}" for lam in lambdas]
    ddim_steps = min(50, T)
    out = []

    steps = [s for s in CONSISTENCY_STEPS if s <= T]
    rows = [sampler.samples(seeds, SamplerSettings("ddim", s)) for s in steps]
    out.append(
        Figure(
            "ddim_consistency",
            "DDIM consistency (DDIM fig. 5): one x_T a column; DDIM with S steps of tau a row",
            torch.cat(rows),
            [f"S={s}" for s in steps],
            [f"seed {s}" for s in seeds],
        )
    )

    pairs = list(zip(seeds[0::2], seeds[1::2]))
    out.append(
        Figure(
            "ddim_interpolation",
            f"DDIM interpolation (DDIM fig. 6): slerp of two x_T by lambda, DDIM-{ddim_steps}",
            torch.cat([sampler.ddim_interpolation(a, b, lambdas, ddim_steps, "uniform") for a, b in pairs]),
            [f"seeds {a}, {b}" for a, b in pairs],
            lambda_labels,
        )
    )

    if pair is None:
        a, b = sampler.samples(seeds[:2], SamplerSettings("ddim", ddim_steps))
        between = f"two DDIM-{ddim_steps} samples"
    else:
        (a, b), between = from_uint8(torch.from_numpy(np.asarray(pair)).permute(0, 3, 1, 2)), "two real images"
    ts = sorted({max(1, round(f * T)) for f in INTERPOLATION_FRACTIONS})
    out.append(
        Figure(
            "ddpm_interpolation",
            f"DDPM interpolation (DDPM fig. 8): {between} noised to t, mixed by lambda, denoised",
            torch.cat([sampler.ddpm_interpolation(a, b, t - 1, lambdas, seed=seeds[0]) for t in ts]),
            [f"t={t}" for t in ts],
            lambda_labels,
        )
    )

    chain_seeds = seeds[:3]
    record, x_t, pred_x0 = sampler.sequences(chain_seeds, SamplerSettings("ddpm"), count=10)
    per_seed = len(record)
    interleaved = [
        frames[i * per_seed : (i + 1) * per_seed] for i in range(len(chain_seeds)) for frames in (x_t, pred_x0)
    ]
    out.append(
        Figure(
            "ddpm_sequence",
            "DDPM diffusion sequence (DDPM figs. 6-7): x_t and the predicted x_0 along one reverse chain",
            torch.cat(interleaved),
            [f"{name} seed {s}" for s in chain_seeds for name in ("x_t", "x_0 pred")],
            [f"t={t + 1}" for t in record],
        )
    )
    return out
