"""Batch sampling over a Ray cluster: seeds (with their classes, for a class-conditional model)
fan out through Ray Data to an actor pool (one model per actor, on a GPU where there is one);
each actor writes its images to storage as PNGs (one per seed, named by seed, in a folder per
class) or npz shards (one per model batch, with the seeds and labels). The driver shows progress
and logs counts, timings, a sample grid (a row per class) and, with `figure_seeds`, the papers'
figures to an MLflow run linked to the training run."""

from __future__ import annotations

import io
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
import torch

from .. import classes
from ..checkpoint import class_names, sampling_defaults
from ..config import SamplerSettings, Speed
from ..figures import Plan
from ..figures import batch_size as figures_batch_size
from ..images import from_uint8, grid, png
from ..pipeline import Pipeline, as_uint8_hwc, resolve_settings
from . import tracking
from .progress import progress, sample_figures
from .resources import Workers, connect, map_with_actors, use_assigned_resources
from .settings import CheckpointOptions, Tracking
from .shards import ShardSet
from .storage import open_location


@dataclass(frozen=True)
class SamplingJob(CheckpointOptions, Tracking):
    """What to sample: a checkpoint's images for `seeds` (one image each; of a conditional model,
    the `classes` asked, `diffusion.classes`), and how; the MLflow experiment its run goes to.
    Resolved against its checkpoint (`resolved`), `seeds` and `labels` name each image."""

    seeds: tuple[int, ...] = tuple(range(64))
    classes: str | None = None  # as asked: names, indices, ranges (None: class seed mod K)
    labels: tuple[int, ...] | None = None  # each image's class, once resolved (None: unconditional)
    settings: SamplerSettings = SamplerSettings()
    speed: Speed = Speed()
    batch_size: int = 64  # images per model batch: the fixed batch shape
    workers: Workers = field(default_factory=Workers)

    @property
    def n(self) -> int:
        return len(self.seeds)

    def params(self) -> dict:
        """The job as flat MLflow params."""
        return {
            "checkpoint": self.checkpoint,
            "which": self.which,
            "n": self.n,
            "seeds": seeds_text(self.seeds),
            "classes": self.classes or "",
            "weights": self.weights,
            "batch_size": self.batch_size,
            "workers": self.workers.count,
            **asdict(self.settings),
            **asdict(self.speed),
        }


def seeds_text(seeds: tuple[int, ...]) -> str:
    """`cli.seed_list`'s inverse: consecutive seeds as ranges (0-63,100)."""
    runs: list[list[int]] = []
    for seed in seeds:
        if runs and seed == runs[-1][1] + 1:
            runs[-1][1] = seed
        else:
            runs.append([seed, seed])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class SampleWriter:
    """A Ray Data actor: samples a batch of images (seeds, and labels of a conditional model) and
    writes it to `out` (unless None)."""

    def __init__(self, job: SamplingJob, out: str | None, fmt: str):
        use_assigned_resources()
        payload = job.read()
        self.pipeline = Pipeline.from_checkpoint(payload, job.batch_size, job.ema, job.speed)
        self.settings, self.fmt, self.conditional = job.settings, fmt, job.labels is not None
        self.location = open_location(out, job.endpoint_url, check=False) if out else None

    def __call__(self, batch: dict) -> dict:
        seeds, labels = batch["seed"].tolist(), batch["label"].tolist() if self.conditional else None
        images = as_uint8_hwc(self.pipeline.samples(seeds, self.settings, classes=labels)).numpy()
        if self.location is not None:
            self._write(seeds, labels, images)
        return {**batch, "image": images}

    def _write(self, seeds: list[int], labels: list[int] | None, images: np.ndarray) -> None:
        if self.fmt == "npz":
            buf = io.BytesIO()
            np.savez(buf, images=images, seeds=np.asarray(seeds), labels=np.asarray(labels or [-1] * len(seeds)))
            first = f"{self.pipeline.classes[labels[0]]}-" if labels else ""
            self.location.write_bytes(f"shard-{first}{seeds[0]:010d}.npz", buf.getvalue())
            return
        for i, (seed, image) in enumerate(zip(seeds, images)):
            folder = f"{self.pipeline.classes[labels[i]]}/" if labels else ""  # a folder per class
            self.location.write_bytes(f"{folder}{seed:010d}.png", png(image))


def resolved(job: SamplingJob, payload: dict) -> SamplingJob:
    """The job resolved against its checkpoint, so that what is logged is what runs: its sampler
    settings (the DDPM variance and clipping, its T; an OptionError names a bad setting, and
    guidance asked of an unconditional model), and each image's seed and class."""
    names = class_names(payload)
    settings = resolve_settings(job.settings, sampling_defaults(payload), len(payload["betas"]), len(names))
    asked = classes.resolve(job.classes, names) if job.classes is not None else None
    seeds, labels = classes.images(job.seeds, asked, len(names))
    return replace(job, settings=settings, seeds=tuple(seeds), labels=None if labels is None else tuple(labels))


def sample_dataset(job: SamplingJob, out: str | None = None, fmt: str = "npz"):
    """A ray.data.Dataset of {"index", "seed", "label", "image": uint8 (B, H, W, C)} for the
    resolved job's images (label -1 for an unconditional model), sampled by an actor pool (each
    actor writes its images to `out` unless it is None)."""
    seeds = np.asarray(job.seeds, dtype=np.int64)
    labels = np.asarray(job.labels if job.labels is not None else [-1] * job.n, dtype=np.int64)
    ds = ray.data.range(job.n).map_batches(
        lambda b: {"index": b["id"], "seed": seeds[b["id"]], "label": labels[b["id"]]}, batch_format="numpy"
    )
    return map_with_actors(ds, SampleWriter, (job, out, fmt), job.batch_size, job.workers.resolve())


def grid_indices(job: SamplingJob) -> list[list[int]]:
    """The images of the job's sample grid, row by row: the first 64 (8 a row); for a conditional
    model a row per class, of its first 10."""
    if job.labels is None:
        first = list(range(min(64, job.n)))
        width = math.ceil(math.sqrt(len(first)))
        return [first[i : i + width] for i in range(0, len(first), width)]
    return classes.rows(job.labels)


def sample_to(
    job: SamplingJob,
    out: str,
    fmt: str = "png",
    figure_seeds: int = 0,
    full_figures: bool = False,
    figure_data: str | None = None,
) -> str:
    """Sample the job's seeds to `out` with a grid of the first 64 (samples.png), and the papers'
    figures from `figure_seeds` seeds (from the first; `full_figures`: with their most expensive
    rows), if any, under out/figures/ (the DDPM interpolation between two images of the prepared
    data set `figure_data`, when given); all of it also to an MLflow run; sampling.json comes
    last. Returns the MLflow run id."""
    payload = job.read()  # bad input fails before Ray starts
    job = resolved(job, payload)
    location = open_location(out, job.endpoint_url)
    location.fs.create_dir(location.path, recursive=True)
    connect()
    job = replace(job, workers=job.workers.resolve())

    T = len(payload["betas"])
    params = {**job.params(), "format": fmt, "out": out, "checkpoint_step": payload["step"]}
    tags = {"kind": "sampling", "checkpoint": job.checkpoint, "training_run_id": payload.get("mlflow_run_id", "")}
    mlflow_run = tracking.Run.create(job.experiment, f"sample-{job.settings.label(T)}-{job.n}", tags, params)

    start, done, preview = time.time(), 0, {}  # preview: the grid's images, by index
    rows = grid_indices(job)
    wanted = {i for row in rows for i in row}
    try:
        with progress(job.n, f"sampling {job.settings.label(T)}", unit="img") as bar:
            for batch in sample_dataset(job, out, fmt).iter_batches(batch_size=None, batch_format="numpy"):
                done += len(batch["seed"])
                bar.update(len(batch["seed"]))
                preview.update((i, im) for i, im in zip(batch["index"].tolist(), batch["image"]) if i in wanted)
    except BaseException:
        mlflow_run.finish("FAILED")
        raise
    seconds = time.time() - start
    print(f"wrote {done} images to {out} in {seconds:.1f} s", flush=True)
    mlflow_run.log_metrics({"images": done, "seconds": seconds, "images_per_s": done / seconds})
    summary = {**params, "n": done}

    shown = torch.from_numpy(np.stack([preview[i] for row in rows for i in row])).permute(0, 3, 1, 2)
    samples = grid(from_uint8(shown), nrow=len(rows[0])).numpy()
    mlflow_run.log_image(samples, "samples")
    location.write_bytes("samples.png", png(samples))
    if figure_seeds:
        local = Pipeline.from_checkpoint(
            payload, figures_batch_size(figure_seeds, job.settings.guided), speed=job.speed
        )
        pair = ShardSet.open(figure_data, job.endpoint_url, verify="size").first_images(2) if figure_data else None
        seeds = tuple(range(job.seeds[0], job.seeds[0] + figure_seeds))
        asked = classes.resolve(job.classes, local.classes) if job.classes is not None else None
        plan = Plan.of(job.settings, T, seeds, pair is not None, full_figures, local.num_classes, asked)
        with tempfile.TemporaryDirectory() as d:
            for figure in sample_figures(local, plan, pair):
                path = Path(d) / f"{figure.name}.png"
                figure.save(path)
                location.write_bytes(f"figures/{figure.name}.png", path.read_bytes())
                mlflow_run.log_artifact(path, "figures")
                print(f"wrote {out.rstrip('/')}/figures/{figure.name}.png: {figure.title}", flush=True)
    location.write_bytes("sampling.json", json.dumps(summary).encode())  # last: the job is complete
    mlflow_run.finish()
    return mlflow_run.id
