"""The core's training loop (`diffusion.training.train_loop`) on Ray Train: DDP across workers
fed by Ray Data, checkpoints in the run's storage that survive worker failures and
resubmission, and MLflow tracking.

    train_on_ray(job)  ->  Training(job).fit()  ->  TorchTrainer(train_loop_per_worker)  ->  ray.train.Result

The driver (`train_on_ray`, through `Training`) checks the job, resolves paths and resources,
reads the held-out set, creates or reuses the MLflow run and starts the trainer. Each worker
runs `train_loop_per_worker`: the core's loop on its share of the batches, with one maintenance
point after each step, where `Due.at(step)` decides together what this step also does: log,
evaluate, FID, sample grid, checkpoint, and the report to Ray Train that carries them. Rank 0
alone writes to MLflow.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, get_device, prepare_model

from ..checkpoint import (
    CHECKPOINT_FILE,
    checkpoint_dir_name,
    parse_checkpoint,
    restore_state,
    save_checkpoint,
    unet_config_of,
)
from ..config import Recipe
from ..digest import weights_digest
from ..errors import OptionError
from ..fid import FeatureStats, InceptionFeatures, frechet_distance, inception_weights
from ..images import from_uint8, grid
from ..pipeline import as_uint8_hwc
from ..speed import use_bf16
from ..training import (
    DeviceData,
    HeldoutSet,
    TrainState,
    build_state,
    ddim_samples,
    fits_on_device,
    recipe_unet,
    shape_fields,
    shaped_to_data,
    train_loop,
)
from ..unet import UNetConfig
from . import tracking
from .checkpoint_uris import read_checkpoint
from .evaluate import inception_judge, reference_stats
from .logs import PROJECT_LOGGER, project_lines_to_stdout
from .resources import Workers, connect, use_assigned_resources
from .run_folder import RunRecord
from .settings import PLACEMENTS, RunSettings, TrainJob
from .shards import ShardSet
from .storage import open_location

log = logging.getLogger(PROJECT_LOGGER)


# ---------------------------------------------------------------------------- driver


def resolve(job: TrainJob) -> TrainJob:
    """The job checked (the one validation of its options), named, and with absolute local
    paths (Ray workers run elsewhere)."""
    settings = job.validate().settings
    changes = {} if settings.name else {"name": f"{job.recipe.model}-{job.recipe.schedule}"}
    for key in ("data", "storage"):
        value = getattr(settings, key)
        if "://" not in value:
            changes[key] = str(Path(value).expanduser().resolve())
    return job.replace(**changes)


def resolve_workers(job: TrainJob) -> TrainJob:
    """Fill the automatic worker count, GPUs and CPUs from the connected Ray cluster."""
    s = job.settings
    workers = Workers(s.num_workers, s.gpus_per_worker, s.cpus_per_worker).resolve(share=True)
    if job.recipe.batch_size % workers.count:
        raise OptionError(f"batch_size {job.recipe.batch_size} must divide evenly over {workers.count} workers")
    return job.replace(num_workers=workers.count, gpus_per_worker=workers.gpus, cpus_per_worker=workers.cpus)


def heldout_images(shards: ShardSet, settings: RunSettings) -> tuple[dict, list[str] | None, str]:
    """The held-out images and their labels ({"image", "label"}) and the splits to train on: the
    heldout split when the data set has one (and other splits remain), else the first training
    images (not held out: said so)."""
    splits, size = shards.manifest["splits"], settings.heldout_size
    if settings.heldout_split in splits and len(splits) > 1:
        train_splits, source = [s for s in splits if s != settings.heldout_split], f"split {settings.heldout_split}"
        wanted = [settings.heldout_split]
    else:
        train_splits, source, wanted = None, f"first {size} training images (no separate split)", None
    batches = []
    for batch in shards.iter_batches(min(size, 1024), splits=wanted):
        batches.append(batch)
        if sum(len(b["label"]) for b in batches) >= size:
            break
    heldout = {key: np.concatenate([b[key] for b in batches])[:size] for key in ("image", "label")}
    return heldout, train_splits, source


def check_classes(recipe: Recipe, manifest: dict, data: str) -> None:
    """An OptionError naming the fix unless a conditional recipe's num_classes is the data set's."""
    if recipe.num_classes and recipe.num_classes != len(manifest["classes"]):
        found = (
            f"{len(manifest['classes'])} classes ({', '.join(manifest['classes'])})"
            if manifest["classes"]
            else "no classes"
        )
        raise OptionError(
            f"num_classes {recipe.num_classes} does not match {data}, which has {found}: "
            + (
                f"give --num-classes {len(manifest['classes'])}"
                if manifest["classes"]
                else "train it unconditionally (--num-classes 0)"
            )
        )


def fid_reference(settings: RunSettings, shards: ShardSet, run: tracking.Run):
    """For in-training FID: the data set's reference statistics (cached beside its shards) and
    the Inception weights, in the object store for the workers; the settings go to MLflow."""
    weights = inception_weights(settings.inception_weights)
    reference = reference_stats(shards, settings.fid_splits.split("+"), inception_judge(str(weights)))
    run.set_tags({f"fid_reference_{key}": reference[key] for key in ("n", "manifest_sha256", "weights_sha256")})
    return ray.put({"mu": reference["mu"], "sigma": reference["sigma"], "weights": weights.read_bytes()})


def train_on_ray(job: TrainJob) -> ray.train.Result:
    """Train with Ray Train on the current Ray cluster (a local one is started if none is
    connected); the same name and storage resume the latest checkpoint. The MLflow run ends
    FINISHED, or FAILED when training raised; then where the MLflow UI shows it is printed."""
    training = Training(job)
    try:
        result = training.fit()
    except BaseException:
        training.run.finish("FAILED")
        raise
    training.run.finish()
    print(f"MLflow run {training.run.id}: {training.run.page()}", flush=True)
    return result


@dataclass(frozen=True)
class InitialWeights:
    """The weights a fine-tune starts from (--init-from), and the recipe it trains them with."""

    sha256: str
    unet: UNetConfig  # theirs, conditioned and regularised as the recipe asks
    recipe: Recipe  # the job's, with the weights' shape
    weights: dict  # their EMA (sampling) weights

    @classmethod
    def read(cls, job: TrainJob, manifest: dict) -> InitialWeights:
        """--init-from's weights, read as --checkpoint reads them; an OptionError where they cannot
        start this job (their shape against the data's, the recipe's shape options or classes)."""
        recipe, where = job.recipe, f"--init-from {job.settings.init_from}"
        payload = read_checkpoint(job.settings.init_from, endpoint_url=job.settings.endpoint_url)
        source = unet_config_of(payload)
        shape = shape_fields(source)
        data = (manifest["height"], manifest["width"], manifest["channels"])
        if (source.image_size, source.image_size, source.in_channels) != data:
            raise OptionError(
                f"{where} takes {source.image_size}x{source.image_size} images of {source.in_channels} channel(s), "
                f"the data's are {data[1]}x{data[0]} of {data[2]}: prepare the data with jobs/prepare_data.py --size "
                f"{source.image_size}, or fine-tune weights of the data's size"
            )
        given = [
            f"--{k.replace('_', '-')} {getattr(recipe, k)}"
            for k, v in shape.items()
            if getattr(recipe, k) not in (0, "", v)
        ]
        if given:
            raise OptionError(f"{where} has its own network shape: drop {', '.join(given)}")
        if source.num_classes not in (0, recipe.num_classes):
            raise OptionError(
                f"{where} is a UNet of {source.num_classes} classes: give --num-classes {source.num_classes}"
            )
        weights = payload["ema"]
        unet = replace(source, num_classes=recipe.num_classes, dropout=recipe.dropout)
        return cls(weights_digest(weights), unet, recipe.replace(**shape), weights)


class Training:
    """One training run, made ready on the driver: the checked job, its data and held-out set,
    its MLflow run (new, with `mlflow_tags`, or the one of its name), and the TorchTrainer.
    `fit` runs it; who made it sets the MLflow run's final status (`fit`, or a sweep's callback)."""

    def __init__(self, job: TrainJob, mlflow_tags: dict | None = None):
        job = resolve(job)
        s = job.settings
        self.shards = ShardSet.open(s.data, s.endpoint_url, verify="size")  # before starting Ray
        manifest = self.shards.manifest
        check_classes(job.recipe, manifest, s.data)
        self.folder = open_location(f"{s.storage.rstrip('/')}/{s.name}", s.endpoint_url, check=False)
        resumed = RunRecord.of_resumed(self.folder)
        self.init = InitialWeights.read(job, manifest) if s.init_from and not resumed else None
        if self.init:
            job, unet = TrainJob(self.init.recipe, s), self.init.unet
        elif resumed and s.init_from:  # a fine-tune resumed: the run's network, its source not read again
            unet = replace(UNetConfig(**resumed.unet), dropout=job.recipe.dropout, num_classes=job.recipe.num_classes)
            job = TrainJob(job.recipe.replace(**shape_fields(unet)), s)
        else:
            job = TrainJob(shaped_to_data(job.recipe, manifest["height"], manifest["width"], manifest["channels"]), s)
            unet = recipe_unet(job.recipe)
        self.unet = unet
        if resumed:
            resumed.check_resume(job.recipe, unet.to_dict(), s.data, self.shards.digest, self.folder.uri)
        if s.fid_every and self.shards.manifest["dataset"] == "digits":
            raise OptionError(
                "in-training FID uses Inception, which does not apply to the 8x8 grey digits: drop --fid-every and "
                "measure FD-digits after training (python jobs/evaluate.py or bench/quality.py)"
            )
        if s.register_model:
            tracking.check_registry()
        connect(verbose=s.verbose)
        self.job = job = resolve_workers(job)
        s = job.settings
        self.heldout, self.train_splits, heldout_source = heldout_images(self.shards, s)
        self.run = tracking.training_run(job, mlflow_tags, resumed.mlflow_run_id if resumed else None)
        RunRecord(self.run.id, s.data, self.shards.digest, job.recipe.to_dict(), unet.to_dict()).write(self.folder)
        if self.init:
            self.run.set_tags({"init_from_sha256": self.init.sha256})
        self.run.set_tags({"heldout_source": heldout_source})
        name = f"{self.shards.manifest['dataset']}:{s.data.rstrip('/').rsplit('/', 1)[-1]}"
        splits = self.train_splits or self.shards.manifest["splits"]
        count = self.shards.count(self.train_splits) if self.train_splits else len(self.shards)
        tracking.log_dataset(self.run, name, s.data, self.shards.digest, count, splits)
        print(
            f"run {s.name}: {count} training images ({'+'.join(splits)}) from {s.data}, {s.num_workers} worker(s) with "
            f"{s.gpus_per_worker:g} GPU and {s.cpus_per_worker:g} CPU each, checkpoints in {s.storage}/{s.name}, "
            f"MLflow run {self.run.id}",
            flush=True,
        )

    def trainer(self, callbacks: list | None = None) -> TorchTrainer:
        job, s, manifest = self.job, self.job.settings, self.shards.manifest
        storage = open_location(s.storage, s.endpoint_url)
        image_bytes = math.prod(manifest[k] for k in ("height", "width", "channels"))
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "job": job,
                "tracking_uri": self.run.uri,
                "run_id": self.run.id,
                "heldout": ray.put(self.heldout),
                "classes": manifest["classes"] if job.recipe.num_classes else [],
                "unet": self.unet.to_dict(),
                "initial_weights": ray.put(self.init.weights) if self.init else None,
                "dataset_bytes": len(self.shards) * image_bytes,
                "fid_reference": fid_reference(s, self.shards, self.run) if s.fid_every else None,
            },
            scaling_config=ScalingConfig(
                num_workers=s.num_workers,
                use_gpu=s.gpus_per_worker > 0,
                resources_per_worker={
                    "CPU": s.cpus_per_worker,
                    **({"GPU": s.gpus_per_worker} if s.gpus_per_worker else {}),
                },
                placement_strategy=PLACEMENTS[s.placement],
            ),
            datasets={
                "train": self.shards.ray_dataset(
                    splits=self.train_splits, columns=["image", "label"]
                ).randomize_block_order()
            },
            run_config=RunConfig(
                name=s.name,
                storage_path=storage.path,
                storage_filesystem=storage.fs,
                failure_config=FailureConfig(max_failures=s.max_failures),
                checkpoint_config=CheckpointConfig(
                    num_to_keep=s.keep_checkpoints,
                    checkpoint_score_attribute=s.score,  # every checkpoint's report carries it
                    checkpoint_score_order="min",
                ),
                callbacks=callbacks,
            ),
        )

    def fit(self, callbacks: list | None = None) -> ray.train.Result:
        """Train (`callbacks`: Ray Train callbacks), then log the final and best weights as MLflow Models."""
        result = self.trainer(callbacks).fit()
        if result.error is None and result.checkpoint:
            manifest = self.shards.manifest
            log_models(self.job.settings, self.run, (manifest["height"], manifest["width"], manifest["channels"]))
        return result


def log_models(settings: RunSettings, run: tracking.Run, image_shape: tuple[int, int, int]) -> None:
    """The run's final and best weights as MLflow Models `model` and `best` (registered under
    --register-model with the aliases `final` and `best`)."""
    run_folder = f"{settings.storage}/{settings.name}"
    versions = {}  # step -> registered version: the best may be the final checkpoint
    with tempfile.TemporaryDirectory() as d:
        for which, alias in (("latest", "final"), ("best", "best")):
            name = tracking.MODEL_NAMES[alias]
            payload = read_checkpoint(run_folder, which, endpoint_url=settings.endpoint_url)
            path = Path(d) / name / CHECKPOINT_FILE
            path.parent.mkdir()
            torch.save({k: v for k, v in payload.items() if k != "optimizer"}, path)  # for sampling
            step = payload["step"]
            model_uri = tracking.log_model(run, path, name, image_shape, step)
            run.set_tags({f"model_step_{name}": step})
            if settings.register_model:
                versions[step] = tracking.register(settings.register_model, alias, model_uri, versions.get(step))
                print(f"{alias} weights (step {step}): models:/{settings.register_model}/{versions[step]}", flush=True)


# ---------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class Due:
    """What the maintenance point after a training step does, decided together."""

    log: bool  # a progress line and the training metrics
    evaluate: bool  # held-out L_simple of the raw and EMA weights
    fid: bool  # FID of fid_n EMA samples, on every rank
    samples: bool  # an EMA sample grid to MLflow
    checkpoint: bool

    @classmethod
    def at(cls, step: int, job: TrainJob) -> Due:
        s, last = job.settings, step == job.recipe.max_steps

        def every(n: int) -> bool:
            return last or (n > 0 and step % n == 0)

        checkpoint = every(s.checkpoint_every)  # its report carries the score Ray Train keeps the best by
        return cls(
            log=every(s.log_every),
            evaluate=every(s.eval_every) or checkpoint,
            fid=s.fid_every > 0 and (every(s.fid_every) or checkpoint),
            samples=every(s.sample_every),
            checkpoint=checkpoint,
        )

    @property
    def any(self) -> bool:
        """Whether this step has a maintenance point, which always ends in a report to Ray Train."""
        return self.log or self.evaluate or self.fid or self.samples or self.checkpoint


class Window:
    """The training metrics since the last report, kept on the device until read (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.loss_sum, self.steps, self.start = torch.zeros((), device=device), 0, time.time()
        self.grad_norm = torch.zeros((), device=device)

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.loss_sum += loss
        self.grad_norm = grad_norm
        self.steps += 1

    def close(self, batch_size: int) -> dict:
        """This window's mean loss, last gradient norm and images/s; a new window starts."""
        metrics = {
            "loss": (self.loss_sum / max(1, self.steps)).item(),
            "grad_norm": self.grad_norm.item(),
            "images_per_s": self.steps * batch_size / max(time.time() - self.start, 1e-9),
        }
        self.loss_sum.zero_()
        self.steps, self.start = 0, time.time()
        return metrics


class Chief:
    """Rank 0's part: the MLflow run, the fixed held-out set, sample grids and progress lines."""

    def __init__(self, loop_config: dict, job: TrainJob, start_step: int, bf16: bool):
        self.job, self.bf16 = job, bf16
        self.run = tracking.Run(loop_config["run_id"], loop_config["tracking_uri"], safe=True)
        heldout = ray.get(loop_config["heldout"])
        images, labels = (torch.from_numpy(np.array(heldout[key])) for key in ("image", "label"))  # writable copies
        self.heldout = HeldoutSet(
            from_uint8(images.permute(0, 3, 1, 2)), job.recipe.num_timesteps, job.recipe.seed, labels
        )
        self.start_step, self.start_time = start_step, time.time()
        self.monitor = tracking.system_metrics(self.run, "rank0") if job.settings.system_metrics else None
        self.logged_lr = None

    def log_metrics(self, metrics: dict, step: int) -> None:
        """The step's metrics to MLflow, the learning rate only where it changed (through warm-up,
        and once where it settles: a constant one plotted as a flat line at 0 on a +-0.5 axis)."""
        if metrics.get("lr") == self.logged_lr:
            metrics = {key: value for key, value in metrics.items() if key != "lr"}
        self.logged_lr = metrics.get("lr", self.logged_lr)
        self.run.log_metrics(metrics, step)

    def evaluate(self, state: TrainState) -> dict:
        return {
            "heldout_loss": self.heldout.loss(state.model, state.schedule, self.bf16),
            "heldout_loss_ema": self.heldout.loss(state.ema.ema_model, state.schedule, self.bf16),
        }

    def log_sample_grid(self, state: TrainState) -> None:
        """EMA samples from seeds 0..sample_n-1 as an MLflow image at this step: the same x_T at
        every step (from step 0, the untrained network's), so that the UI steps through the run's
        progress. A conditional model's grid has a row per class, of seeds 0..sample_n // K - 1
        (at least one), guided by sample_guidance."""
        s, num_classes = self.job.settings, self.job.recipe.num_classes
        if not num_classes:
            x = ddim_samples(state.ema.ema_model, state.schedule, range(s.sample_n), s.sample_steps, self.bf16)
            self.run.log_image(grid(x).numpy(), "samples", state.step)
            return
        columns = max(1, s.sample_n // num_classes)
        classes = [c for c in range(num_classes) for _ in range(columns)]
        seeds = list(range(columns)) * num_classes
        x = ddim_samples(
            state.ema.ema_model, state.schedule, seeds, s.sample_steps, self.bf16, classes, s.sample_guidance
        )
        self.run.log_image(grid(x, nrow=columns).numpy(), "samples", state.step)

    def progress(self, step: int, metrics: dict) -> str:
        max_steps = self.job.recipe.max_steps
        seconds_left = (max_steps - step) * (time.time() - self.start_time) / max(1, step - self.start_step)
        parts = [
            f"step {step}/{max_steps}",
            f"loss {metrics['loss']:.4f}",
            f"lr {metrics['lr']:.2e}",
            f"grad {metrics['grad_norm']:.3f}",
            f"{metrics['images_per_s']:.0f} img/s",
        ]
        if "heldout_loss" in metrics:
            parts.append(f"held-out {metrics['heldout_loss']:.4f} (EMA {metrics['heldout_loss_ema']:.4f})")
        if "fid" in metrics:
            parts.append(f"FID {metrics['fid']:.2f}")
        return " | ".join(parts) + f" | time left {timedelta(seconds=int(seconds_left))}"


class FidProbe:
    """In-training FID: each rank samples its share of fid_n EMA images, Inception statistics
    are summed across ranks, rank 0 compares them with the data set's reference."""

    def __init__(self, reference_ref, device: torch.device, bf16: bool):
        self.reference = ray.get(reference_ref)
        self.net = InceptionFeatures(io.BytesIO(self.reference["weights"])).to(device)
        self.device, self.bf16 = device, bf16

    def measure(self, state: TrainState, job: TrainJob, rank: int, world: int) -> dict:
        s = job.settings
        stats, seeds = FeatureStats(), list(range(rank, s.fid_n, world))
        per_worker, num_classes = job.recipe.batch_size // world, job.recipe.num_classes
        for start in range(0, len(seeds), per_worker):
            batch = seeds[start : start + per_worker]
            classes = [seed % num_classes for seed in batch] if num_classes else None  # each class in turn
            x = ddim_samples(
                state.ema.ema_model, state.schedule, batch, s.sample_steps, self.bf16, classes, s.sample_guidance
            )
            stats.add(self.net(as_uint8_hwc(x))[0].cpu().numpy())
        if world > 1:
            sums = torch.from_numpy(np.concatenate([[stats.n], stats.sum, stats.outer.ravel()])).to(self.device)
            dist.all_reduce(sums)
            sums = sums.cpu().numpy()
            dim = len(stats.sum)
            stats.n, stats.sum, stats.outer = int(sums[0]), sums[1 : 1 + dim], sums[1 + dim :].reshape(dim, dim)
        return {"fid": frechet_distance(stats.mu, stats.sigma, self.reference["mu"], self.reference["sigma"])}


def restore_from_ray_checkpoint(state: TrainState) -> bool:
    """Load Ray Train's latest checkpoint of this run into `state` (a resume or a restart after
    a failure); False when the run starts fresh."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return False
    with checkpoint.as_directory() as d:
        path = Path(d) / CHECKPOINT_FILE
        restore_state(parse_checkpoint(path.read_bytes(), str(path)), state)
    return True


def epochs(job: TrainJob, device: torch.device, world: int, dataset_bytes: int, chief: Chief | None):
    """A function returning one epoch of this worker's batches on `device`, uint8 (B, H, W, C)
    images and their int64 labels: streamed by Ray Data, or (data_on_device) read once onto the
    device and reshuffled there."""
    per_worker = job.recipe.batch_size // world
    shard = ray.train.get_dataset_shard("train")

    def ray_data(batch_size: int = per_worker, drop_last: bool = True):
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            dtypes={"image": torch.uint8, "label": torch.int64},
            device=device,
            drop_last=drop_last,
            local_shuffle_buffer_size=4 * batch_size,
        ):
            yield batch["image"], batch["label"]

    placement = job.settings.data_on_device
    on_device = placement == "on" or (placement == "auto" and fits_on_device(dataset_bytes // world, device))
    if not on_device:
        return ray_data
    chunks = list(ray_data(4096, drop_last=False))
    if not chunks:
        chunks = [(torch.empty(0, 0, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64))]
    cached = DeviceData(torch.cat([images for images, _ in chunks]), torch.cat([labels for _, labels in chunks]))
    if chief:
        chief.run.log_metrics({"images_on_device": len(cached)}, 0)
        log.info(f"training images kept on {device}: {len(cached)} on rank 0, {cached.images.nbytes / 2**20:.0f} MiB")
    return lambda: cached.epoch(per_worker)


def report(
    metrics: dict, state: TrainState, job: TrainJob, rank: int, loop_config: dict, with_checkpoint: bool
) -> None:
    """Report to Ray Train (a barrier on every rank), with a checkpoint saved by rank 0 when due:
    the recipe, the class names of a conditional model, and the run settings as information."""
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            classes = {"classes": loop_config["classes"]} if loop_config["classes"] else {}
            save_checkpoint(
                d,
                state,
                job.recipe,
                metrics,
                job.settings.score,
                run=job.settings.to_dict(),
                mlflow_run_id=loop_config["run_id"],
                **classes,
            )
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(d) if rank == 0 else None,
            checkpoint_dir_name=checkpoint_dir_name(state.step),
        )


def replicas_identical(state: TrainState, world: int) -> bool:
    """Whether the weights and EMA weights are equal on every rank (DDP kept them in step): a hash
    of them gathered from every rank, which must all call this."""
    digest = hashlib.sha256()
    for model in (state.model, state.ema.ema_model):
        for p in model.parameters():
            digest.update(p.detach().float().cpu().numpy().tobytes())
    fingerprints = [digest.hexdigest()] * world
    if world > 1:
        dist.all_gather_object(fingerprints, fingerprints[0])
    return len(set(fingerprints)) == 1


def ranks_by_node(world: int) -> str:
    """Where the ranks run, from every rank: '192.0.2.2 (ranks 0, 1), 192.0.2.3 (rank 2)'."""
    nodes = [ray.util.get_node_ip_address()] * world
    if world > 1:
        dist.all_gather_object(nodes, nodes[0])
    ranks = {node: [rank for rank, at in enumerate(nodes) if at == node] for node in dict.fromkeys(nodes)}
    return ", ".join(f"{node} (rank{'s' * (len(r) > 1)} {', '.join(map(str, r))})" for node, r in ranks.items())


def train_loop_per_worker(loop_config: dict) -> None:
    job: TrainJob = loop_config["job"]
    recipe, s = job.recipe, job.settings
    project_lines_to_stdout()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device()
    threads = use_assigned_resources(reading_share=0.0 if s.gpus_per_worker else 1 / world)
    bf16 = use_bf16(s.precision, device, training=True)
    channels_last = s.channels_last == "on" or (s.channels_last == "auto" and device.type == "cuda")
    initial = loop_config["initial_weights"]
    unet = UNetConfig(**loop_config["unet"])
    state = build_state(recipe, device, rank, channels_last, unet, ray.get(initial) if initial else None)
    resumed = restore_from_ray_checkpoint(state)
    net = prepare_model(state.model, move_to_device=False)  # DDP; every rank starts from rank 0's weights
    if s.compile:
        net = torch.compile(net)
    chief = Chief(loop_config, job, state.step, bf16) if rank == 0 else None
    fid = FidProbe(loop_config["fid_reference"], device, bf16) if s.fid_every else None
    epoch = epochs(job, device, world, loop_config["dataset_bytes"], chief)
    nodes = ranks_by_node(world)
    if chief:
        precision = "bf16" if bf16 else "fp32"
        chief.run.set_tags({"torch_threads_per_worker": threads, "precision_used": precision})
        log.info(f"{world} worker(s) on {device.type}, {threads} torch thread(s) each, {precision}, on {nodes}")
    if chief and resumed:
        log.info(f"resumed from checkpoint at step {state.step}")
        chief.run.log_metrics({"resumed_from_step": state.step}, state.step)
    if chief and state.step == 0:
        chief.run.log_metrics(chief.evaluate(state), 0)
        chief.log_sample_grid(state)  # MLflow's image card opens at step 0: without one it shows none

    window = Window(device)
    finished = {}  # what the last step's maintenance found

    def maintenance(loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        window.add(loss, grad_norm)
        due = Due.at(state.step, job)
        if not due.any:
            return
        # Every rank takes part in FID and the report; rank 0 alone evaluates and logs.
        metrics = {**window.close(recipe.batch_size), "lr": state.optimizer.param_groups[0]["lr"]}
        if due.fid:
            metrics.update(fid.measure(state, job, rank, world))
        if state.step == recipe.max_steps:  # before the last report, after which a Tune scheduler may stop the trial
            metrics["replicas_identical"] = float(replicas_identical(state, world))
            finished["identical"] = bool(metrics["replicas_identical"])
        if chief:
            if due.evaluate:
                metrics.update(chief.evaluate(state))
            chief.log_metrics(metrics, state.step)
            log.info(chief.progress(state.step, metrics))
            if due.samples:
                chief.log_sample_grid(state)
        report({**metrics, "step": state.step}, state, job, rank, loop_config, due.checkpoint)
        if chief and due.checkpoint:  # `runs:/<run_id>` stands for the latest checkpoint
            uri = f"{s.storage}/{s.name}/{checkpoint_dir_name(state.step)}"
            chief.run.set_tags({tracking.CHECKPOINT_TAG: uri})

    train_loop(state, recipe, epoch, recipe.max_steps, net, bf16, after_step=maintenance)

    identical = finished["identical"] if finished else replicas_identical(state, world)  # no step left after a resume
    if chief:
        if chief.monitor:
            chief.monitor.finish()
        log.info(f"done at step {state.step}: {world} replica(s), weights and EMA identical across ranks: {identical}")
