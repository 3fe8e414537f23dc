"""The papers' figures from a `Pipeline`, as labelled PNGs:

    ddim_consistency       DDIM fig. 5: one x_T per column, DDIM (or DPM-Solver++(2M), the plan's
                           ODE solver) with S steps of tau per row
    ddim_interpolation     DDIM fig. 6: slerp of two x_T by lambda (columns), decoded with DDIM
    ddpm_interpolation     DDPM fig. 8: two images (first and last column; real images when
                           given) noised to t (rows), mixed by lambda (columns), denoised by
                           the reverse process
    ddpm_sequence          DDPM figs. 6-7: x_t and the predicted x_0 along one reverse chain,
                           at the timesteps t of the columns
    class_grid             a class-conditional model's classes (rows) from the same x_T
                           (columns), sampled with the run's settings (and its guidance)

A class-conditional model's other figures draw each seed's class (seed mod K, as every entry
point by default) with the run's guidance; an interpolation, the class of its first seed.

A `Plan` chooses the rows and counts their model calls: by default those that cost a few
hundred calls, with `full` the papers' most expensive ones too. Timesteps in labels are the
papers' (1-based: t = T is pure noise); the code's 0-based index is t - 1. `jobs/generate.py
--figures` and the batch job write the same files.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from .config import SamplerSettings
from .images import from_uint8, to_uint8
from .pipeline import Pipeline, steps_of

CONSISTENCY_STEPS = (10, 20, 50, 100)  # S of DDIM fig. 5 (those <= T); full adds S = 1000
INTERPOLATION_FRACTIONS = (0.1,)  # DDPM interpolation from t = T/10; full adds T/4 and T/2
FULL_CONSISTENCY_STEPS = CONSISTENCY_STEPS + (1000,)
FULL_INTERPOLATION_FRACTIONS = (0.1, 0.25, 0.5)
DDIM_STEPS = 50  # of the DDIM interpolation, and of the diffusion sequence unless full
LAMBDAS = 9  # evenly spaced in [0, 1]
SOLVER_NAMES = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)"}


def batch_size(figure_seeds: int, guided: bool = False) -> int:
    """The model batch that fits every figure's calls (the seeds, or the lambdas; twice as many
    rows when guided) without padding."""
    return max(figure_seeds, LAMBDAS) * (2 if guided else 1)


@dataclass(frozen=True)
class Plan:
    """Which rows the figures have and the model calls each figure costs (a call: one sampler
    step on one batch of `batch_size` images). The default rows cost a few hundred calls; `full`
    adds the papers' most expensive ones: DDIM S = 1000, DDPM interpolation from T/4 and T/2,
    and a DDPM chain of all T steps for the diffusion sequence (a DDIM-50 chain with eta 1,
    the DDPM-like sampler on a sub-sequence, otherwise)."""

    num_timesteps: int
    seeds: tuple[int, ...]
    real_pair: bool  # the DDPM interpolation between two given images (else two DDIM samples)
    full: bool = False
    solver: str = "ddim"  # the consistency figure's ODE solver: ddim or dpmpp_2m
    sampling: SamplerSettings = field(default_factory=SamplerSettings)  # the run's: the class grid's, every guidance
    num_classes: int = 0  # of a class-conditional model
    class_rows: tuple[int, ...] = ()  # the class grid's classes

    @classmethod
    def of(
        cls,
        settings: SamplerSettings,
        num_timesteps: int,
        seeds: tuple[int, ...],
        real_pair: bool,
        full: bool,
        num_classes: int = 0,
        classes: Sequence[int] | None = None,
    ):
        """The plan of a run sampling with `settings`: the consistency figure by its sampler when
        that is DPM-Solver++(2M), by DDIM otherwise; for a model of `num_classes` classes, a class
        grid of `classes` (default: all)."""
        solver = "dpmpp_2m" if settings.sampler == "dpmpp_2m" else "ddim"
        rows = tuple(classes if classes is not None else range(num_classes))
        return cls(num_timesteps, seeds, real_pair, full, solver, settings, num_classes, rows)

    def guided(self, settings: SamplerSettings) -> SamplerSettings:
        """`settings` with the run's guidance."""
        s = self.sampling
        return replace(
            settings, guidance_scale=s.guidance_scale, guidance_min_t=s.guidance_min_t, guidance_max_t=s.guidance_max_t
        )

    def classes_of(self, seeds: Sequence[int]) -> list[int] | None:
        """The classes a conditional model's figures draw from `seeds`: seed mod K."""
        return [seed % self.num_classes for seed in seeds] if self.num_classes else None

    @property
    def consistency_steps(self) -> list[int]:
        return [s for s in (FULL_CONSISTENCY_STEPS if self.full else CONSISTENCY_STEPS) if s <= self.num_timesteps]

    @property
    def ddim_steps(self) -> int:
        return min(DDIM_STEPS, self.num_timesteps)

    @property
    def interpolation_ts(self) -> list[int]:
        """The papers' 1-based t the DDPM interpolation noises to, one a row."""
        fractions = FULL_INTERPOLATION_FRACTIONS if self.full else INTERPOLATION_FRACTIONS
        return sorted({max(1, round(f * self.num_timesteps)) for f in fractions})

    @property
    def sequence(self) -> SamplerSettings:
        return SamplerSettings("ddpm") if self.full else SamplerSettings("ddim", self.ddim_steps, eta=1.0)

    def calls(self) -> dict[str, int]:
        """Model calls of each figure, in the order they are made."""
        ddim = steps_of(SamplerSettings("ddim", self.ddim_steps), self.num_timesteps)
        grid = {"class_grid": len(self.class_rows) * steps_of(self.sampling, self.num_timesteps)}
        return {
            **(grid if self.class_rows else {}),
            "ddim_consistency": sum(
                steps_of(SamplerSettings(self.solver, s), self.num_timesteps) for s in self.consistency_steps
            ),
            "ddim_interpolation": len(self.seeds) // 2 * ddim,
            "ddpm_interpolation": (0 if self.real_pair else ddim) + sum(self.interpolation_ts),
            "ddpm_sequence": steps_of(self.sequence, self.num_timesteps),
        }

    def describe(self) -> str:
        """The rows chosen, and what `full` would add, in words."""
        full = replace(self, full=True)
        rows = (
            f"{SOLVER_NAMES[self.solver]} S={','.join(map(str, self.consistency_steps))}; DDPM interpolation from "
            f"t={','.join(map(str, self.interpolation_ts))}; diffusion sequence by {self.sequence.label(self.num_timesteps)}"
        )
        if self.full:
            return rows
        extra = sum(full.calls().values()) - sum(self.calls().values())
        return f"{rows} (--full-figures: the papers' S=1000, t up to T/2 and a DDPM chain, {extra} calls more)"


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


def figures(pipeline: Pipeline, plan: Plan, pair: np.ndarray | None = None) -> Iterator[Figure]:
    """The four figures of `plan` (its seeds an even count, at least 2), each as soon as it is
    sampled. `pair`: two real images, uint8 (2, H, W, C), for the DDPM interpolation, else two
    DDIM samples of the first seeds."""
    seeds = list(plan.seeds)
    lambdas = np.linspace(0, 1, LAMBDAS).tolist()
    lambda_labels = [f"lambda {lam:.2f}" for lam in lambdas]
    ddim_steps = plan.ddim_steps

    classes = plan.classes_of(seeds)
    seed_labels = [
        f"seed {s}" + (f" {pipeline.classes[c]}" if classes else "") for s, c in zip(seeds, classes or seeds)
    ]
    first_class = {s: c for s, c in zip(seeds, classes)} if classes else {}

    if plan.class_rows:
        yield Figure(
            "class_grid",
            f"Classes: a class a row, one x_T a column; {plan.sampling.label(pipeline.num_timesteps)}",
            torch.cat([pipeline.samples(seeds, plan.sampling, classes=[c] * len(seeds)) for c in plan.class_rows]),
            [pipeline.classes[c] for c in plan.class_rows],
            [f"seed {s}" for s in seeds],
        )

    steps = plan.consistency_steps
    yield Figure(
        "ddim_consistency",
        f"Consistency (DDIM fig. 5): one x_T a column; {SOLVER_NAMES[plan.solver]} with S steps of tau a row",
        torch.cat(
            [pipeline.samples(seeds, plan.guided(SamplerSettings(plan.solver, s)), classes=classes) for s in steps]
        ),
        [f"S={s}" for s in steps],
        seed_labels,
    )

    pairs = list(zip(seeds[0::2], seeds[1::2]))
    ddim = plan.guided(SamplerSettings("ddim", ddim_steps))
    yield Figure(
        "ddim_interpolation",
        f"DDIM interpolation (DDIM fig. 6): slerp of two x_T by lambda, DDIM-{ddim_steps}",
        torch.cat([pipeline.ddim_interpolation(a, b, lambdas, ddim, first_class.get(a)) for a, b in pairs]),
        [f"seeds {a}, {b}" for a, b in pairs],
        lambda_labels,
    )

    if pair is None:
        a, b = pipeline.samples(seeds[:2], ddim, classes=plan.classes_of(seeds[:2]))
        between, source = f"two DDIM-{ddim_steps} samples", "sample"
    else:
        (a, b), between, source = (
            from_uint8(torch.from_numpy(np.asarray(pair)).permute(0, 3, 1, 2)),
            "two given images",
            "image",
        )
    ts = plan.interpolation_ts
    a, b = a.to(pipeline.device), b.to(pipeline.device)
    ddpm, label = plan.guided(SamplerSettings("ddpm")), first_class.get(seeds[0])
    rows = [
        torch.cat([a[None], pipeline.ddpm_interpolation(a, b, t - 1, lambdas, seeds[0], label, ddpm), b[None]])
        for t in ts
    ]
    yield Figure(
        "ddpm_interpolation",
        f"DDPM interpolation (DDPM fig. 8): {between} (left, right) noised to t, mixed by lambda, denoised",
        torch.cat(rows),
        [f"t={t}" for t in ts],
        [f"{source} a", *lambda_labels, f"{source} b"],
    )

    chain_seeds = seeds[:3]
    record, x_t, pred_x0 = pipeline.sequences(
        chain_seeds, plan.guided(plan.sequence), count=10, classes=plan.classes_of(chain_seeds)
    )
    per_seed = len(record)
    interleaved = [
        frames[i * per_seed : (i + 1) * per_seed] for i in range(len(chain_seeds)) for frames in (x_t, pred_x0)
    ]
    yield Figure(
        "ddpm_sequence",
        f"Diffusion sequence (DDPM figs. 6-7), {plan.sequence.label(pipeline.num_timesteps)}: "
        "x_t and the predicted x_0 along one reverse chain",
        torch.cat(interleaved),
        [f"{name} {label}" for label in seed_labels[:3] for name in ("x_t", "x_0 pred")],
        [f"t={t + 1}" for t in record],
    )
