"""Distributed training on Ray Train: DDP across workers fed by Ray Data, checkpoints in the
run's storage that survive worker failures and resubmission, and MLflow tracking.

    fit(config)  ->  TorchTrainer(train_loop_per_worker)  ->  ray.train.Result

The driver (`fit`) resolves paths and resources, reads the held-out set, creates or reuses the
MLflow run and starts the trainer. Each worker runs `train_loop_per_worker`: a flat loop of
training steps (`diffusion.training.train_step`) with one maintenance point per step, where
`Due.at(step)` decides together what this step also does: log, evaluate, FID, sample grid,
checkpoint, and the report to Ray Train that carries them. Rank 0 alone writes to MLflow.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import (
    CHECKPOINT_FILE,
    checkpoint_dir_name,
    parse_checkpoint,
    read_checkpoint,
    restore_state,
    save_checkpoint,
    score_name,
)
from ..config import TrainConfig
from ..errors import OptionError
from ..images import from_uint8, grid, to_model_input
from ..sampling import as_uint8_hwc
from ..training import (
    DeviceData,
    HeldoutSet,
    TrainState,
    build_state,
    ddim_samples,
    fits_on_device,
    lr_at,
    sample_grid,
    train_step,
)
from . import tracking
from .resources import Workers, connect, use_assigned_resources
from .shards import ShardSet
from .storage import open_location

log = logging.getLogger("ray_diffusion")


# ---------------------------------------------------------------------------- driver


def resolve_paths(config: TrainConfig) -> TrainConfig:
    """Validate, name the run, and make local paths absolute (Ray workers run elsewhere)."""
    config.validate()
    changes = {} if config.name else {"name": f"{config.model}-{config.schedule}"}
    for key in ("data", "storage"):
        value = getattr(config, key)
        if "://" not in value:
            changes[key] = str(Path(value).expanduser().resolve())
    return config.replace(**changes)


def resolve_workers(config: TrainConfig) -> TrainConfig:
    """Fill the automatic worker count, GPUs and CPUs from the connected Ray cluster."""
    workers = Workers(config.num_workers, config.gpus_per_worker, config.cpus_per_worker).resolve(share=True)
    config = config.replace(num_workers=workers.count, gpus_per_worker=workers.gpus, cpus_per_worker=workers.cpus)
    if config.batch_size % config.num_workers:
        raise OptionError(f"batch_size {config.batch_size} must divide evenly over {config.num_workers} workers")
    return config


def heldout_images(shards: ShardSet, config: TrainConfig) -> tuple[np.ndarray, list[str] | None, str]:
    """The held-out images and the splits to train on: the heldout split when the data set has
    one (and other splits remain), else the first training images (not held out: said so)."""
    splits = shards.manifest["splits"]
    if config.heldout_split in splits and len(splits) > 1:
        train_splits, source = [s for s in splits if s != config.heldout_split], f"split {config.heldout_split}"
        wanted = [config.heldout_split]
    else:
        train_splits, source, wanted = None, f"first {config.heldout_size} training images (no separate split)", None
    images = []
    for batch in shards.iter_batches(min(config.heldout_size, 1024), splits=wanted):
        images.append(batch["image"])
        if sum(len(i) for i in images) >= config.heldout_size:
            break
    return np.concatenate(images)[: config.heldout_size], train_splits, source


def fid_reference(config: TrainConfig, shards: ShardSet, run: tracking.Run):
    """For in-training FID: the data set's reference statistics (cached beside its shards) and
    the Inception weights, in the object store for the workers; the settings go to MLflow."""
    import ray

    from ..fid import inception_weights
    from .evaluate import inception_judge, reference_stats

    weights = inception_weights(config.inception_weights or None)
    reference = reference_stats(shards, config.fid_splits.split("+"), inception_judge(str(weights)))
    run.set_tags({f"fid_reference_{key}": reference[key] for key in ("n", "manifest_sha256", "weights_sha256")})
    return ray.put({"mu": reference["mu"], "sigma": reference["sigma"], "weights": weights.read_bytes()})


def fit(config: TrainConfig, callbacks: list | None = None, mlflow_tags: dict | None = None, close_run: bool = True):
    """Train with Ray Train on the current Ray cluster (a local one is started if none is
    connected). The same name and storage resume the latest checkpoint. `callbacks` are Ray
    Train callbacks; `mlflow_tags` go on a new MLflow run (a sweep's parent, say); with
    close_run=False the caller sets the run's final status (a sweep, whose scheduler may stop it)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = resolve_paths(config)
    shards = ShardSet.open(config.data, config.endpoint_url or None, verify="size")  # before starting Ray
    if config.fid_every and shards.manifest["dataset"] == "digits":
        raise OptionError(
            "in-training FID uses Inception, which does not apply to the 8x8 grey digits: drop --fid-every and "
            "measure FD-digits after training (python jobs/evaluate.py or bench/quality.py)"
        )
    if config.register_model:
        tracking.check_registry()
    connect()
    config = resolve_workers(config)
    heldout, train_splits, heldout_source = heldout_images(shards, config)
    storage = open_location(config.storage, config.endpoint_url or None)
    run = tracking.training_run(config, mlflow_tags)
    run.set_tags({"heldout_source": heldout_source})
    name = f"{shards.manifest['dataset']}:{config.data.rstrip('/').rsplit('/', 1)[-1]}"
    tracking.log_dataset(run, name, config.data, shards.digest, len(shards), train_splits or shards.manifest["splits"])
    print(
        f"run {config.name}: {len(shards)} images from {config.data}, {config.num_workers} worker(s) with "
        f"{config.gpus_per_worker:g} GPU and {config.cpus_per_worker:g} CPU each, checkpoints in {config.storage}/{config.name}, MLflow run {run.id}",
        flush=True,
    )
    image_bytes = math.prod(shards.manifest[k] for k in ("height", "width", "channels"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "tracking_uri": run.uri,
            "run_id": run.id,
            "heldout": ray.put(heldout),
            "dataset_bytes": len(shards) * image_bytes,
            "fid_reference": fid_reference(config, shards, run) if config.fid_every else None,
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": config.cpus_per_worker,
                **({"GPU": config.gpus_per_worker} if config.gpus_per_worker else {}),
            },
        ),
        datasets={"train": shards.ray_dataset(splits=train_splits, columns=["image"]).randomize_block_order()},
        run_config=RunConfig(
            name=config.name,
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                checkpoint_score_attribute=score_name(config),  # every checkpoint's report carries it
                checkpoint_score_order="min",
            ),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
        if result.error is None and result.checkpoint:
            log_models(config, run, (shards.manifest["height"], shards.manifest["width"], shards.manifest["channels"]))
    except BaseException:
        if close_run:
            run.finish("FAILED")
        raise
    if close_run:
        run.finish()
    return result


def log_models(config: TrainConfig, run: tracking.Run, image_shape: tuple[int, int, int]) -> None:
    """The run's final and best weights as MLflow Models `model` and `best` (registered under
    --register-model with the aliases `final` and `best`)."""
    run_folder = f"{config.storage}/{config.name}"
    versions = {}  # step -> registered version: the best may be the final checkpoint
    with tempfile.TemporaryDirectory() as d:
        for which, alias in (("latest", "final"), ("best", "best")):
            name = tracking.MODEL_NAMES[alias]
            payload = read_checkpoint(run_folder, config.endpoint_url or None, which)
            path = Path(d) / name / CHECKPOINT_FILE
            path.parent.mkdir()
            torch.save({k: v for k, v in payload.items() if k != "optimizer"}, path)  # for sampling
            model_uri = tracking.log_model(run, path, name, image_shape)
            step = payload["step"]
            run.set_tags({f"model_step_{name}": step})
            if config.register_model:
                versions[step] = tracking.register(config.register_model, alias, model_uri, versions.get(step))
                print(f"{alias} weights (step {step}): models:/{config.register_model}/{versions[step]}", flush=True)


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
    def at(cls, step: int, config: TrainConfig) -> Due:
        last = step == config.max_steps

        def every(n: int) -> bool:
            return last or (n > 0 and step % n == 0)

        checkpoint = every(config.checkpoint_every)  # its report carries the score Ray Train keeps the best by
        return cls(
            log=every(config.log_every),
            evaluate=every(config.eval_every) or checkpoint,
            fid=config.fid_every > 0 and (every(config.fid_every) or checkpoint),
            samples=every(config.sample_every),
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

    def __init__(self, loop_config: dict, config: TrainConfig, start_step: int):
        import ray

        self.config = config
        self.run = tracking.Run(loop_config["run_id"], loop_config["tracking_uri"], safe=True)
        images = torch.from_numpy(np.array(ray.get(loop_config["heldout"])))  # a writable copy
        self.heldout = HeldoutSet(from_uint8(images.permute(0, 3, 1, 2)), config.num_timesteps, config.seed)
        self.start_step, self.start_time = start_step, time.time()
        self.monitor = tracking.system_metrics(self.run, "rank0") if config.system_metrics else None

    def evaluate(self, state: TrainState) -> dict:
        return {
            "heldout_loss": self.heldout.loss(state.model, state.schedule, self.config),
            "heldout_loss_ema": self.heldout.loss(state.ema.ema_model, state.schedule, self.config),
        }

    def log_sample_grid(self, state: TrainState) -> None:
        """EMA samples from fixed seeds as an MLflow image at this step (the UI steps through them)."""
        images = grid(sample_grid(state.ema.ema_model, state.schedule, self.config)).numpy()
        self.run.log_image(images, "samples", state.step)

    def progress(self, step: int, metrics: dict) -> str:
        config = self.config
        seconds_left = (config.max_steps - step) * (time.time() - self.start_time) / max(1, step - self.start_step)
        parts = [
            f"step {step}/{config.max_steps}",
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

    def __init__(self, reference_ref, device: torch.device):
        import ray

        from ..fid import InceptionFeatures

        self.reference = ray.get(reference_ref)
        self.net = InceptionFeatures(io.BytesIO(self.reference["weights"])).to(device)
        self.device = device

    def measure(self, state: TrainState, config: TrainConfig, rank: int, world: int) -> dict:
        import torch.distributed as dist

        from ..fid import FeatureStats, frechet_distance

        stats, seeds = FeatureStats(), list(range(rank, config.fid_n, world))
        per_worker = config.batch_size // world
        for start in range(0, len(seeds), per_worker):
            x = ddim_samples(state.ema.ema_model, state.schedule, config, seeds[start : start + per_worker])
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
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return False
    with checkpoint.as_directory() as d:
        path = Path(d) / CHECKPOINT_FILE
        restore_state(parse_checkpoint(path.read_bytes(), str(path)), state)
    return True


def epochs(config: TrainConfig, device: torch.device, world: int, dataset_bytes: int, chief: Chief | None):
    """A function returning one epoch of this worker's uint8 (B, H, W, C) batches on `device`:
    streamed by Ray Data, or (data_on_device) read once onto the device and reshuffled there."""
    import ray.train

    per_worker = config.batch_size // world
    shard = ray.train.get_dataset_shard("train")

    def ray_data(batch_size: int = per_worker, drop_last: bool = True):
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            dtypes={"image": torch.uint8},
            device=device,
            drop_last=drop_last,
            local_shuffle_buffer_size=4 * batch_size,
        ):
            yield batch["image"]

    on_device = config.data_on_device == "on" or (
        config.data_on_device == "auto" and fits_on_device(dataset_bytes // world, device)
    )
    if not on_device:
        return ray_data
    chunks = list(ray_data(4096, drop_last=False)) or [torch.empty(0, 0, 0, 0, dtype=torch.uint8)]
    cached = DeviceData(torch.cat(chunks))
    if chief:
        chief.run.log_metrics({"images_on_device": len(cached)}, 0)
        log.info(f"training images kept on {device}: {len(cached)} on rank 0, {cached.images.nbytes / 2**20:.0f} MiB")
    return lambda: cached.epoch(per_worker)


def report(metrics: dict, state: TrainState, config: TrainConfig, rank: int, run_id: str, with_checkpoint: bool):
    """Report to Ray Train (a barrier on every rank), with a checkpoint saved by rank 0 when due."""
    import ray.train
    from ray.train import Checkpoint

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            save_checkpoint(d, state, config, metrics, mlflow_run_id=run_id)
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(d) if rank == 0 else None,
            checkpoint_dir_name=checkpoint_dir_name(state.step),
        )


def fingerprint(state: TrainState) -> str:
    """A hash of the weights and EMA weights: equal on every rank when DDP kept them in step."""
    digest = hashlib.sha256()
    for model in (state.model, state.ema.ema_model):
        for p in model.parameters():
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_model

    config = TrainConfig.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device()
    threads = use_assigned_resources()
    state = build_state(config, device, rank)
    resumed = restore_from_ray_checkpoint(state)
    net = prepare_model(state.model, move_to_device=False)  # DDP; every rank starts from rank 0's weights
    if config.compile:
        net = torch.compile(net)
    chief = Chief(loop_config, config, state.step) if rank == 0 else None
    fid = FidProbe(loop_config["fid_reference"], device) if config.fid_every else None
    epoch = epochs(config, device, world, loop_config["dataset_bytes"], chief)
    if chief:
        chief.run.set_tags({"torch_threads_per_worker": threads})
        log.info(f"{world} worker(s) on {device.type}, {threads} torch thread(s) each")
    if chief and resumed:
        log.info(f"resumed from checkpoint at step {state.step}")
        chief.run.log_metrics({"resumed_from_step": state.step}, state.step)
    if chief and state.step == 0:
        chief.run.log_metrics(chief.evaluate(state), 0)

    window = Window(device)
    while state.step < config.max_steps:
        for images in epoch():
            loss, grad_norm = train_step(state, net, to_model_input(images), config)
            window.add(loss, grad_norm)
            due = Due.at(state.step, config)
            if due.any:
                # Every rank takes part in FID and the report; rank 0 alone evaluates and logs.
                metrics = {**window.close(config.batch_size), "lr": lr_at(config, state.step - 1)}
                if due.fid:
                    metrics.update(fid.measure(state, config, rank, world))
                if chief:
                    if due.evaluate:
                        metrics.update(chief.evaluate(state))
                    chief.run.log_metrics(metrics, state.step)
                    log.info(chief.progress(state.step, metrics))
                    if due.samples:
                        chief.log_sample_grid(state)
                report({**metrics, "step": state.step}, state, config, rank, loop_config["run_id"], due.checkpoint)
                if chief and due.checkpoint:  # `runs:/<run_id>` stands for the latest checkpoint
                    uri = f"{config.storage}/{config.name}/{checkpoint_dir_name(state.step)}"
                    chief.run.set_tags({tracking.CHECKPOINT_TAG: uri})
            if state.step >= config.max_steps:
                break

    fingerprints = [fingerprint(state)] * world
    if world > 1:
        dist.all_gather_object(fingerprints, fingerprints[0])
    if chief:
        identical = len(set(fingerprints)) == 1
        chief.run.log_metrics({"replicas_identical": float(identical)}, state.step)
        if chief.monitor:
            chief.monitor.finish()
        log.info(f"done at step {state.step}: {world} replica(s), weights and EMA identical across ranks: {identical}")
