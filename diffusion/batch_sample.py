"""Batch sampling over a Ray cluster: seeds fan out through Ray Data to an actor pool (one
model per actor, on a GPU where there is one); each actor writes its images to storage as
PNGs (one per seed, named by seed) or npz shards (one per model batch). The driver shows
progress and logs counts, timings, a sample grid and, with `figures`, the papers' figures
to an MLflow run linked to the training run."""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .checkpoint import read_checkpoint
from .data.storage import open_location
from .generate import Sampler, SamplerSettings, as_uint8_hwc
from .images import from_uint8, save_grid
from .schedule import make_betas
from .speed import SamplerSpeed
from .training import TrainConfig
from .unet import build_unet


def sampler_from(payload: dict, batch_size: int, ema: bool = True, speed: SamplerSpeed = SamplerSpeed()) -> Sampler:
    """A Sampler on this process's GPU (or CPU) from a checkpoint payload."""
    config = TrainConfig(**payload["config"])
    model = build_unet(config.model, dropout=config.dropout)
    model.load_state_dict(payload["ema" if ema else "model"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    betas = make_betas(config.schedule, config.num_timesteps, config.beta_start, config.beta_end)
    return Sampler(model.to(device), betas, batch_size, speed)


class SampleWriter:
    """A Ray Data actor: samples a batch of seeds and writes it to `out` (unless None)."""

    def __init__(self, checkpoint, settings, out, fmt, batch_size, endpoint_url, ema=True, speed=SamplerSpeed()):
        self.sampler = sampler_from(read_checkpoint(checkpoint, endpoint_url), batch_size, ema, speed)
        self.settings, self.fmt = settings, fmt
        self.location = open_location(out, endpoint_url, check=False) if out else None

    def __call__(self, batch: dict) -> dict:
        seeds = batch["seed"].tolist()
        images = as_uint8_hwc(self.sampler.samples(seeds, self.settings)).numpy()
        if self.location is not None:
            self._write(seeds, images)
        return {"seed": batch["seed"], "image": images}

    def _write(self, seeds: list[int], images: np.ndarray) -> None:
        if self.fmt == "npz":
            buf = io.BytesIO()
            np.savez(buf, images=images, seeds=np.asarray(seeds))
            self.location.write_bytes(f"shard-{seeds[0]:010d}.npz", buf.getvalue())
            return
        from PIL import Image

        for seed, image in zip(seeds, images):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            self.location.write_bytes(f"{seed:010d}.png", buf.getvalue())


def figures(sampler: Sampler, seeds: list[int]) -> dict[str, tuple[torch.Tensor, int]]:
    """The papers' figures as (images in [-1, 1], images per row):
    consistency of DDIM over tau from one x_T (DDIM fig. 5), DDIM slerp interpolation
    (DDIM fig. 6), DDPM interpolation from t=100 and t=250 (DDPM fig. 8), and DDPM
    diffusion sequences of x_t and predicted x_0 (DDPM figs. 6-7)."""
    out = {}
    rows = [sampler.samples(seeds, SamplerSettings("ddim", steps)) for steps in (10, 20, 50, 100, 1000)]
    out["consistency_tau_10_20_50_100_1000"] = torch.cat(rows), len(seeds)
    lambdas = np.linspace(0, 1, 10).tolist()
    pairs = list(zip(seeds[0::2], seeds[1::2]))
    out["ddim_slerp_interpolation"] = (
        torch.cat([sampler.ddim_interpolation(a, b, lambdas, 50, "uniform") for a, b in pairs]),
        len(lambdas),
    )
    ends = sampler.samples([s for pair in pairs for s in pair], SamplerSettings("ddim", 50))
    for t in (100, 250):
        grids = [
            sampler.ddpm_interpolation(ends[2 * i], ends[2 * i + 1], t - 1, lambdas, seed=i) for i in range(len(pairs))
        ]
        out[f"ddpm_interpolation_t{t}"] = torch.cat(grids), len(lambdas)  # the paper's t is the 0-based index t - 1
    record, x_t, pred_x0 = sampler.sequences(seeds[:4], SamplerSettings("ddpm"), count=10)
    out["ddpm_sequence_x_t"] = x_t, len(record)
    out["ddpm_sequence_pred_x0"] = pred_x0, len(record)
    return out


def resolve_workers(workers: int, gpus_per_worker: float) -> tuple[int, float]:
    """Actors and GPUs per actor: by default one actor per GPU of the cluster, or one on CPU."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    gpus_per_worker = (1.0 if gpus else 0.0) if gpus_per_worker < 0 else gpus_per_worker
    return workers or (max(1, int(gpus)) if gpus else 1), gpus_per_worker


def sample_dataset(
    checkpoint: str,
    n: int,
    settings: SamplerSettings,
    out: str | None,
    seed: int = 0,
    fmt: str = "png",
    batch_size: int = 64,
    workers: int = 1,
    gpus_per_worker: float = 0,
    endpoint_url: str | None = None,
    ema: bool = True,
    speed: SamplerSpeed = SamplerSpeed(),
):
    """A ray.data.Dataset of {"seed", "image": uint8 (B, H, W, C)} for seeds seed..seed+n-1,
    sampled by an actor pool (each actor writes its images to `out` unless it is None)."""
    import ray

    ds = ray.data.range(n).map_batches(lambda b: {"seed": b["id"] + seed}, batch_format="numpy")
    return ds.map_batches(
        SampleWriter,
        fn_constructor_args=(checkpoint, settings, out, fmt, batch_size, endpoint_url, ema, speed),
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=gpus_per_worker,
        num_cpus=0.5 if not gpus_per_worker else 1,
        compute=ray.data.ActorPoolStrategy(size=workers),
    )


def run(
    checkpoint: str,
    n: int,
    settings: SamplerSettings,
    out: str,
    seed: int = 0,
    fmt: str = "png",
    batch_size: int = 64,
    workers: int = 0,
    gpus_per_worker: float = -1,
    endpoint_url: str | None = None,
    with_figures: bool = False,
    figure_seeds: int = 8,
    experiment: str = "ray-diffusion",
    speed: SamplerSpeed = SamplerSpeed(),
) -> str:
    """Sample seeds seed..seed+n-1 to `out`; returns the MLflow run id."""
    import ray
    from mlflow.tracking import MlflowClient

    if not ray.is_initialized():
        ray.init()
    workers, gpus_per_worker = resolve_workers(workers, gpus_per_worker)
    payload = read_checkpoint(checkpoint, endpoint_url)
    location = open_location(out, endpoint_url)
    location.fs.create_dir(location.path, recursive=True)

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    experiment_id = exp.experiment_id if exp else client.create_experiment(experiment)
    tags = {"kind": "sampling", "checkpoint": checkpoint, "training_run_id": payload.get("mlflow_run_id", "")}
    run_id = client.create_run(experiment_id, run_name=f"sample-{settings.sampler}-{n}", tags=tags).info.run_id
    params = {
        "n": n,
        "seed": seed,
        "format": fmt,
        "batch_size": batch_size,
        "workers": workers,
        "out": out,
        "checkpoint_step": payload["step"],
        **asdict(settings),
        **asdict(speed),
    }
    for k, v in params.items():
        client.log_param(run_id, k, v)

    ds = sample_dataset(
        checkpoint, n, settings, out, seed, fmt, batch_size, workers, gpus_per_worker, endpoint_url, speed=speed
    )
    start, done, preview = time.time(), 0, {}  # preview: the first 64 seeds' images, for the grid
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            done += len(batch["seed"])
            preview.update((s, im) for s, im in zip(batch["seed"].tolist(), batch["image"]) if s < seed + 64)
            rate = done / (time.time() - start)
            print(
                f"\rsampled {done}/{n} ({rate:.1f} img/s, eta {(n - done) / max(rate, 1e-9):.0f} s)",
                end="",
                file=sys.stderr,
                flush=True,
            )
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    seconds = time.time() - start
    print(f"\nwrote {done} images to {out} in {seconds:.1f} s", flush=True)
    client.log_metric(run_id, "images", done)
    client.log_metric(run_id, "seconds", seconds)
    client.log_metric(run_id, "images_per_s", done / seconds)
    location.write_bytes("sampling.json", json.dumps({"n": done, "seeds": [seed, seed + n - 1], **params}).encode())

    with tempfile.TemporaryDirectory() as d:
        grid = torch.from_numpy(np.stack([preview[s] for s in sorted(preview)])).permute(0, 3, 1, 2)
        save_grid(from_uint8(grid), Path(d) / "samples.png")
        client.log_artifact(run_id, str(Path(d) / "samples.png"))
        if with_figures:
            # The figures' batches hold figure_seeds images or 10 lambdas: no padding to batch_size.
            local = sampler_from(payload, min(batch_size, max(figure_seeds, 10)), speed=speed)
            for name, (grid, per_row) in figures(local, list(range(seed, seed + figure_seeds))).items():
                save_grid(grid, Path(d) / f"{name}.png", nrow=per_row)
                client.log_artifact(run_id, str(Path(d) / f"{name}.png"), "figures")
    client.set_terminated(run_id, status="FINISHED")
    return run_id
