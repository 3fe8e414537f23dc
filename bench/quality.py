"""DDIM's Table 1 in miniature: sample quality against the number of steps S, eta and the tau
spacing, measured on data 2 CPU cores can learn: the 8x8 digits, and CIFAR-10 with the
cifar10-cpu preset (Song et al. 2021, Table 1 and section 5.2; Ho et al. 2020 for DDPM), with
DPM-Solver++(2M) (Lu et al. 2022) beside DDIM at S = 5, 10, 20, 50 (--solver-steps).

    python bench/quality.py                                  # prepare + train the digits preset, then the grid
    python bench/quality.py --checkpoint runs/digits-linear --n 1000    # bench/results/quality-digits: 32 min
    python bench/quality.py --train-steps 600 --n 200 --steps 10 50 --etas 0 1 --spacings uniform
    python bench/quality.py --checkpoint runs/cifar10-cpu-linear --data data/cifar10 --n 1000 --steps 10 20 50 100 \
        --etas 0 1 --spacings quadratic --no-sigma-hat --ddpm posterior --out bench/results/quality-cifar10
    python bench/quality.py --checkpoint runs/digits-classes --n 500 --steps 50 --etas 0 --spacings uniform \
        --no-sigma-hat --ddpm --solver-steps 10 --guidance 0 1 2 3 5 3@0-600 --out bench/results/quality-digits-classes

A class-conditional model draws each class in turn (seed i: class i mod K) and every cell is
sampled at each --guidance scale (classifier-free guidance; 0 is its unconditional model, 1 the
conditional one; SCALE@MIN-MAX guides only at 0-based timesteps MIN..MAX), with one more measure:
the class agreement, the share of samples the judge classifies as the class they were asked for
(real test images: the judge's accuracy).

Every cell samples the same seeds 0..N-1, so all cells start from the same x_T (DDIM eq. 12
with sigma(eta) of eq. 16; sigma-hat is the row "sigma-hat": eta = 1 with DDPM's beta_t
variance; DDPM-1000 is Ho et al.'s ancestral sampler with beta-tilde_t or beta_t; DPM-Solver++
on the same spacings). Each cell:
the FD (FD-digits, FD-CIFAR10: the Frechet distance in the features of a classifier trained on
the train split, the FID analogue; diffusion/classifier.py), the classifier score (the IS analogue), the share
of samples classified with confidence >= 0.9, and for DDIM and DPM-Solver++ the consistency: the mean RMS
distance (in [-1, 1] pixel units) of each image to the image of the same x_T from the eta = 0,
uniform cell with the most steps, S = 1000 in the full grid (section 5.2: DDIM's x_0 depends on
x_T alone, whatever the tau). The floor is the FD between
the real test split and the train split, the untrained line the FD of an untrained UNet.

Cells run cheapest first; with --budget-minutes, those that would not fit are listed as
skipped. Writes quality.json, quality.md (laid out like Table 1, the paper's CIFAR-10 FIDs
beside), grids/<cell>.png (the first 64 samples) and ddim50.npz (uint8 N x H x W x C, DDIM-50
eta 0 uniform). Absolute numbers are CPU timings of this machine, so only the sample-quality
columns are comparable across machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from core import describe, machine  # bench/core.py, beside this script

from diffusion import classes
from diffusion.checkpoint import recipe_of, unet_config_of
from diffusion.classifier import Scorer
from diffusion.config import SamplerSettings
from diffusion.images import save_grid, to_uint8
from diffusion.pipeline import Pipeline
from diffusion.platform.cli import add_checkpoint_options, add_options, checkpoint_options
from diffusion.platform.settings import PRESETS
from diffusion.unet import build_unet

# FID of 50,000 CIFAR-10 samples, Song et al. 2021, Table 1 (quadratic tau for CIFAR-10);
# the sigma-hat row at S = 1000 is Ho et al.'s DDPM (3.17).
PAPER_CIFAR10 = {
    "0.0": {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16, 1000: 4.04},
    "0.2": {10: 14.04, 20: 7.11, 50: 4.77, 100: 4.25, 1000: 4.09},
    "0.5": {10: 16.66, 20: 8.35, 50: 5.25, 100: 4.46, 1000: 4.29},
    "1.0": {10: 41.07, 20: 18.36, 50: 8.01, 100: 5.78, 1000: 4.73},
    "sigma-hat": {10: 367.43, 20: 133.37, 50: 32.72, 100: 9.99, 1000: 3.17},
}


@dataclass(frozen=True)
class Cell:
    row: str  # an eta ("0.0") or "sigma-hat"; "ddpm" for DDPM-1000; "dpmpp_2m" for DPM-Solver++(2M)
    steps: int  # also the model calls per image
    spacing: str
    settings: SamplerSettings

    @property
    def sampler(self) -> str:
        """The cell's sampler without its guidance: ddpm-1000-posterior, dpmpp_2m-10-uniform, ddim-50-0.0-uniform."""
        if self.settings.sampler == "ddpm":
            return f"ddpm-1000-{self.settings.variance}"
        if self.settings.sampler == "dpmpp_2m":
            return f"dpmpp_2m-{self.steps}-{self.spacing}"
        return f"ddim-{self.steps}-{self.row}-{self.spacing}"

    @property
    def guidance(self) -> str:
        """The cell's guidance as --guidance names it: 1, 3, 3@0-600."""
        s = self.settings
        interval = s.guidance_min_t or s.guidance_max_t is not None
        return f"{s.guidance_scale:g}" + (f"@{s.guidance_min_t}-{s.guidance_max_t}" if interval else "")

    @property
    def name(self) -> str:
        return self.sampler + ("" if self.guidance == "1" else f"-cfg{self.guidance.replace('@', '-t')}")


def guidance_settings(spec: str) -> dict:
    """SamplerSettings' guidance fields of a --guidance item: SCALE or SCALE@MIN-MAX."""
    scale, _, interval = spec.partition("@")
    low, _, high = interval.partition("-")
    try:
        values = {"guidance_scale": float(scale)}
        if interval:
            values |= {"guidance_min_t": int(low), "guidance_max_t": int(high)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r} is not a guidance scale or SCALE@MIN-MAX (e.g. 3@0-600)") from None
    return values


def cells(
    steps: list[int],
    etas: list[float],
    spacings: list[str],
    sigma_hat: bool,
    ddpm: list[str],
    solver_steps: list[int],
    clip: bool | None = None,
    guidance: tuple[str, ...] = ("1",),
) -> list[Cell]:
    """The grid, cheapest first: DDIM, DDPM-1000 and DPM-Solver++(2M) (on the same spacings),
    each at every `guidance` (`guidance_settings`). Quadratic tau needs S well below T (its
    timesteps repeat towards S = T), so it stops at S = 100 as in the DDIM reference. `clip`:
    every cell clips its predicted x_0 (True), none does (False), or each sampler's default
    (None: the checkpoint's for DDPM, off otherwise)."""
    rows = [(f"{eta:.1f}", eta, "posterior") for eta in etas] + ([("sigma-hat", 1.0, "beta")] if sigma_hat else [])
    grid = [
        Cell(row, s, spacing, SamplerSettings("ddim", s, eta, spacing, variance, clip=clip))
        for s in steps
        for spacing in spacings
        if not (spacing == "quadratic" and s > 100)
        for row, eta, variance in rows
    ]
    grid += [Cell("ddpm", 1000, "-", SamplerSettings("ddpm", variance=v, clip=clip)) for v in ddpm]
    grid += [
        Cell("dpmpp_2m", s, spacing, SamplerSettings("dpmpp_2m", s, spacing=spacing, clip=clip))
        for s in solver_steps
        for spacing in spacings
        if not (spacing == "quadratic" and s > 100)
    ]
    grid = [replace(cell, settings=replace(cell.settings, **guidance_settings(g))) for cell in grid for g in guidance]
    return sorted(grid, key=lambda c: c.steps)


def generate(pipeline: Pipeline, settings: SamplerSettings, n: int, batch_size: int) -> torch.Tensor:
    """Samples of seeds 0..n-1 in [-1, 1], (n, C, H, W); of a conditional model, seed i of class
    i mod K (`labels`)."""
    return torch.cat(
        [
            pipeline.samples(
                range(i, min(i + batch_size, n)), settings, classes=labels(pipeline, i, min(i + batch_size, n))
            )
            for i in range(0, n, batch_size)
        ]
    )


def labels(pipeline: Pipeline, start: int, stop: int) -> list[int] | None:
    """The classes of seeds start..stop-1 of a conditional model: each class in turn."""
    return classes.images(range(start, stop), None, pipeline.num_classes)[1]


def as_images(x: torch.Tensor) -> np.ndarray:
    return to_uint8(x).permute(0, 2, 3, 1).numpy()


def train_preset(data: str, storage: str, train_steps: int | None) -> str:
    """Prepare the digits (if absent) and train the digits preset through Ray Train; returns
    the run folder."""
    from diffusion.platform.ray_train import train_on_ray
    from diffusion.platform.shards import write_shards
    from diffusion.platform.sources import digits_source
    from diffusion.platform.storage import open_location

    location = open_location(data)
    if not location.exists("manifest.json"):
        write_shards(digits_source(["train", "test"]), location)
    config = PRESETS["digits"].replace(data=data, storage=storage)
    if train_steps:
        config = config.replace(max_steps=train_steps, name=f"digits-quality-{train_steps}")
    config = config.replace(name=config.settings.name or "digits-quality")
    result = train_on_ray(config)
    if result.error:
        raise SystemExit(f"training failed: {result.error}")
    return f"{storage}/{config.settings.name}"


CLIPPING = {
    None: "",
    True: "Every cell (and the untrained line) clips its predicted x_0 to [-1, 1]. ",
    False: "No cell clips its predicted x_0. ",
}


def markdown(report: dict) -> str:
    """Table 1's layout: a row per eta (and sigma-hat), a column per S; the FD measured here,
    the paper's CIFAR-10 FID in brackets; then the consistency, DDPM and every cell."""
    results = {r["cell"]: r for r in report["cells"]}
    steps = sorted({r["steps"] for r in report["cells"] if r["sampler"] == "ddim"})

    def table(spacing: str, value) -> list[str]:
        shown = [s for s in steps if any(f"ddim-{s}-{row}-{spacing}" in results for row in PAPER_CIFAR10)]
        lines = ["| eta | " + " | ".join(f"S = {s}" for s in shown) + " |", "|---|" + "---|" * len(shown)]
        for row, paper in PAPER_CIFAR10.items():
            cells_ = [results.get(f"ddim-{s}-{row}-{spacing}") for s in shown]
            if any(cells_):
                # paper.get: S outside Table 1's columns (e.g. --steps 2) has no paper value
                text = [value(c, paper.get(s)) if c else "-" for c, s in zip(cells_, shown)]
                lines.append(f"| {row} | " + " | ".join(text) + " |")
        return lines

    lines = [
        f"# DDIM Table 1 in miniature: {report['checkpoint']} (step {report['checkpoint_step']})",
        "",
        f"{report['metric']} of {report['n']} samples per cell (seeds 0..{report['n'] - 1}: the same x_T in every cell) "
        f"against the {report['reference_n']} train images. Floor (the {report['floor_n']} real test images "
        f"against train) {report['floor']:.2f}; an untrained UNet {report['untrained']['fd']:.1f}. "
        f"Confident share (classified with confidence >= 0.9): real test images {report['real']['confident']:.3f}, "
        f"untrained {report['untrained']['confident']:.3f}. "
        + CLIPPING[report.get("clip")]
        + "In brackets: the paper's CIFAR-10 FID (Song et al. 2021, Table 1). "
        f"{describe(report['machine'])}; {report['minutes']:.1f} min.",
    ]
    for spacing in report["spacings"]:
        if not any(r["spacing"] == spacing for r in report["cells"]):
            continue
        lines += ["", f"## {spacing} tau", ""]
        lines += table(spacing, lambda c, paper: f"{c['fd']:.2f}" + (f" ({paper})" if paper else ""))
        if report["consistency_anchor"]:
            lines += [
                "",
                f"Consistency: mean RMS distance ([-1, 1] units) to the image of the same x_T from "
                f"{report['consistency_anchor']}:",
                "",
            ]
            lines += table(spacing, lambda c, paper: f"{c['consistency']:.3f}")
    lines += solver_table(report, results)
    lines += guidance_tables(report)
    ddpm = [r for r in report["cells"] if r["sampler"] == "ddpm"]
    if ddpm:
        lines += ["", "## DDPM, 1000 steps", "", f"| variance | {report['metric']} | classifier score | confident |"]
        lines += ["|---|---|---|---|"]
        lines += [f"| {r['variance']} | {r['fd']:.2f} | {r['score']:.2f} | {r['confident']:.3f} |" for r in ddpm]
    agreement = any("class_agreement" in r for r in report["cells"])
    lines += ["", "## Every cell", ""]
    lines += [
        f"| cell | {report['metric']} | {report['metric']} of the first {report['floor_n']} (floor {report['floor']:.2f}) "
        "| classifier score | confident >= 0.9 | class shares (min-max) | "
        + ("class agreement (min class) | " if agreement else "")
        + "consistency | seconds |",
        "|---|---|---|---|---|---|" + ("---|" if agreement else "") + "---|---|",
    ]
    for r in report["cells"]:
        consistency = "-" if r["consistency"] is None else f"{r['consistency']:.3f}"
        shares = f"{min(r['class_shares']):.3f}-{max(r['class_shares']):.3f}"
        agreed = f"{r['class_agreement']:.3f} ({min(r['class_agreement_per_class']):.3f}) | " if agreement else ""
        lines.append(
            f"| {r['cell']} | {r['fd']:.2f} | {r['fd_at_floor_n']:.2f} | {r['score']:.2f} | {r['confident']:.3f} "
            f"| {shares} | {agreed}{consistency} | {r['seconds']:.0f} |"
        )
    if report["skipped"]:
        lines += ["", f"Skipped for the {report['budget_minutes']}-minute budget: {', '.join(report['skipped'])}."]
    return "\n".join(lines) + "\n"


def solver_table(report: dict, results: dict) -> list[str]:
    """DPM-Solver++(2M) beside DDIM eta 0 (both deterministic solvers of the same ODE) at every S
    either was sampled at: the FD, and the consistency in brackets."""
    solver = [r for r in report["cells"] if r["sampler"] == "dpmpp_2m"]
    if not solver:
        return []
    lines = ["", "## DPM-Solver++(2M) beside DDIM (eta 0)", ""]
    lines += [f"{report['metric']}; in brackets the consistency, where there is an anchor (as above). Same x_T."]
    for spacing in report["spacings"]:
        if not any(r["spacing"] == spacing for r in solver):
            continue
        names = {"DDIM": "ddim-{}-0.0-" + spacing, "DPM-Solver++(2M)": "dpmpp_2m-{}-" + spacing}
        shown = sorted(
            {r["steps"] for r in report["cells"] if r["cell"] in {n.format(r["steps"]) for n in names.values()}}
        )
        lines += ["", f"{spacing} tau:", "", "| sampler | " + " | ".join(f"S = {s}" for s in shown) + " |"]
        lines += ["|---|" + "---|" * len(shown)]
        for name, pattern in names.items():
            found = [results.get(pattern.format(s)) for s in shown]
            text = ["-" if c is None else f"{c['fd']:.2f}" + consistency_note(c) for c in found]
            lines.append(f"| {name} | " + " | ".join(text) + " |")
    return lines


def guidance_tables(report: dict) -> list[str]:
    """A class-conditional model's cells by guidance scale (a column each), a row per sampler: the
    class agreement (its lowest class's in brackets), the confident share and the FD."""
    if not report.get("classes"):
        return []
    columns = list(report["guidance"])
    by = {(r["sampler_cell"], r["guidance"]): r for r in report["cells"]}
    samplers = list(dict.fromkeys(r["sampler_cell"] for r in report["cells"]))
    real = report["real"]
    lines = [
        "",
        "## Classifier-free guidance",
        "",
        (
            f"A column per guidance scale s (0: the unconditional model, 1: the conditional one; s@MIN-MAX: guided "
            f"at 0-based timesteps MIN..MAX only). Seed i draws class i mod {len(report['classes'])}. Real test "
            f"images: class agreement (the judge's accuracy) {real['class_agreement']:.3f}, confident "
            f"{real['confident']:.3f}."
        ),
    ]
    header = ["| sampler | " + " | ".join(f"s = {g}" for g in columns) + " |", "|---|" + "---|" * len(columns)]
    measures = {
        "Class agreement (the share classified as the class asked for; the lowest class's in brackets)": lambda r: (
            f"{r['class_agreement']:.3f} ({min(r['class_agreement_per_class']):.3f})"
        ),
        "Confident share (>= 0.9)": lambda r: f"{r['confident']:.3f}",
        f"{report['metric']}": lambda r: f"{r['fd']:.2f}",
    }
    for title, value in measures.items():
        lines += ["", f"{title}:", "", *header]
        for sampler in samplers:
            text = [value(by[sampler, g]) if (sampler, g) in by else "-" for g in columns]
            lines.append(f"| {sampler} | " + " | ".join(text) + " |")
    return lines


def consistency_note(result: dict) -> str:
    return "" if result["consistency"] is None else f" ({result['consistency']:.3f})"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_options(p, required=False)  # without --checkpoint: the digits preset is trained here
    p.add_argument("--data", default="data/digits", help="the prepared digits (prepared here when absent) or CIFAR-10")
    p.add_argument("--storage", default="runs", help="where the preset trains when no --checkpoint is given")
    p.add_argument("--train-steps", type=int, default=None, help="train this many steps instead of the preset's")
    p.add_argument("--n", type=int, default=500, help="samples per cell")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100, 1000], help="DDIM S values")
    p.add_argument("--etas", type=float, nargs="+", default=[0.0, 0.2, 0.5, 1.0], help="DDIM eta rows")
    p.add_argument("--spacings", nargs="+", default=["uniform", "quadratic"], choices=["uniform", "quadratic"])
    p.add_argument("--no-sigma-hat", action="store_true", help="skip the sigma-hat row")
    p.add_argument(
        "--solver-steps", type=int, nargs="*", default=[5, 10, 20, 50], help="DPM-Solver++(2M) S values (none: skip)"
    )
    p.add_argument(
        "--ddpm",
        nargs="*",
        default=["posterior", "beta"],
        choices=["posterior", "beta"],
        help="DDPM-1000 variances (none: skip)",
    )
    p.add_argument(
        "--guidance",
        nargs="+",
        default=["1"],
        help="guidance scales of a class-conditional model, each a column of cells: SCALE, or SCALE@MIN-MAX to guide "
        "at 0-based timesteps MIN..MAX only (0: its unconditional model; 1: the conditional one)",
    )
    # --clip for every cell and the untrained line (SamplerSettings' flag)
    add_options(p, SamplerSettings, skip={f.name for f in fields(SamplerSettings)} - {"clip"})
    p.add_argument("--batch-size", type=int, default=500, help="samples per model call")
    p.add_argument("--budget-minutes", type=float, default=0, help="skip cells that would not fit (0: no limit)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="bench/results/quality-digits", help="output folder")
    args = p.parse_args(argv)
    if args.n < 2:
        p.error("--n must be >= 2 (a covariance needs two samples)")
    for spec in args.guidance:
        try:
            guidance_settings(spec)
        except argparse.ArgumentTypeError as e:
            p.error(f"--guidance: {e}")
    return args


def run_cells(pipeline: Pipeline, scorer: Scorer, plan: list[Cell], args, out: Path, since: float):
    """Sample and score each cell of `plan` (skipping what would overrun the budget counted from
    `since`): (results with their samples under "_x", skipped cell names, whether ddim50.npz was written)."""
    done, skipped, per_call, wrote_npz = [], [], None, False
    for cell in plan:
        elapsed = (time.time() - since) / 60
        if args.budget_minutes and per_call and elapsed + per_call * cell.steps / 60 > args.budget_minutes:
            skipped.append(cell.name)
            continue
        t0 = time.time()
        x = generate(pipeline, cell.settings, args.n, args.batch_size)
        seconds = time.time() - t0
        per_call = seconds / cell.steps
        images = as_images(x)
        result = {"cell": cell.name, "row": cell.row, "steps": cell.steps, "spacing": cell.spacing}
        result |= {"sampler": cell.settings.sampler, "eta": cell.settings.eta, "variance": cell.settings.variance}
        result |= {"guidance": cell.guidance, "sampler_cell": cell.sampler}
        asked = labels(pipeline, 0, args.n)
        result |= {**scorer(images, asked), "seconds": seconds, "consistency": None, "_x": x}
        done.append(result)
        save_grid(x[:64], out / "grids" / f"{cell.name}.png")
        if cell.name == "ddim-50-0.0-uniform":
            np.savez_compressed(out / "ddim50.npz", images=images)
            wrote_npz = True
        agreement = f"  class agreement {result['class_agreement']:.3f}" if asked else ""
        print(
            f"{cell.name:28s} FD {result['fd']:8.2f}  score {result['score']:.2f}  "
            f"confident {result['confident']:.3f}{agreement}  ({seconds:.0f} s)",
            flush=True,
        )
    return done, skipped, wrote_npz


def add_consistency(done: list[dict]) -> dict | None:
    """Each DDIM and DPM-Solver++ cell's RMS distance to the consistency anchor of its guidance,
    the eta 0 uniform DDIM cell with the most steps (S = 1000 in the full grid; both solve the ODE
    it solves most finely); the samples are dropped. Returns the unguided cells' anchor (s = 1)."""
    deterministic = [r for r in done if r["sampler"] == "ddim" and r["row"] == "0.0" and r["spacing"] == "uniform"]
    anchors = {}
    for r in sorted(deterministic, key=lambda r: r["steps"]):
        anchors[r["guidance"]] = r  # the most steps last
    anchor_x = {g: r["_x"] for g, r in anchors.items()}
    for result in done:
        x = result.pop("_x")
        if result["guidance"] in anchor_x and result["sampler"] != "ddpm":
            difference = x - anchor_x[result["guidance"]]
            result["consistency"] = difference.pow(2).flatten(1).mean(1).sqrt().mean().item()
    return anchors.get("1")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusion.platform.evaluate import own_judge
    from diffusion.platform.shards import ShardSet

    start = time.time()
    checkpoint = args.checkpoint or train_preset(args.data, args.storage, args.train_steps)
    trained_at = time.time()
    source = replace(checkpoint_options(args), checkpoint=checkpoint)
    payload = source.read()
    shards = ShardSet.open(args.data)
    judge = own_judge(shards)
    label = judge.metric.upper().replace("_", "-").replace("DIGITS", "digits")  # FD-digits, FD-CIFAR10
    train = next(shards.iter_batches(len(shards), splits=["train"]))["image"]
    test, test_labels = (next(shards.iter_batches(len(shards), splits=["test"]))[k] for k in ("image", "label"))
    scorer = Scorer(judge.build(), train, test)
    pipeline = Pipeline.from_checkpoint(payload, batch_size=args.batch_size, ema=source.ema, device="cpu")

    torch.manual_seed(0)
    untrained_pipeline = Pipeline(build_unet(unet_config_of(payload)), pipeline.betas, args.batch_size)
    untrained_settings = SamplerSettings(steps=50, clip=args.clip)
    untrained = scorer(as_images(generate(untrained_pipeline, untrained_settings, args.n, args.batch_size)))

    out = Path(args.out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    if pipeline.num_classes and pipeline.classes != shards.manifest["classes"]:
        raise SystemExit(f"the model's classes {pipeline.classes} are not the judge's {shards.manifest['classes']}")
    if not pipeline.num_classes and args.guidance != ["1"]:
        raise SystemExit(f"--guidance {' '.join(args.guidance)}: the model is unconditional (trained without classes)")
    plan = cells(
        args.steps,
        args.etas,
        args.spacings,
        not args.no_sigma_hat,
        args.ddpm,
        args.solver_steps,
        args.clip,
        tuple(args.guidance),
    )
    done, skipped, wrote_npz = run_cells(pipeline, scorer, plan, args, out, trained_at)
    anchor = add_consistency(done)
    report = {
        "checkpoint": str(checkpoint),
        "checkpoint_step": payload["step"],
        "model": recipe_of(payload).model,
        "metric": label,
        "judge_sha256": judge.sha256,
        "n": args.n,
        "seeds": f"0..{args.n - 1}",
        "clip": args.clip,
        "reference_n": len(train),
        "floor": scorer.floor,
        "floor_n": scorer.floor_n,
        "untrained": untrained,
        "real": scorer(test, test_labels),  # the real test images, judged as the samples are (agreement: accuracy)
        "guidance": args.guidance,
        "classes": pipeline.classes,
        "spacings": args.spacings,
        "consistency_anchor": anchor["cell"] if anchor else None,
        "cells": done,
        "skipped": skipped,
        "budget_minutes": args.budget_minutes,
        "minutes": (time.time() - start) / 60,
        "train_minutes": (trained_at - start) / 60 if not args.checkpoint else 0,
        "machine": machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    (out / "quality.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out}: quality.json, quality.md, grids/" + (", ddim50.npz" if wrote_npz else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
