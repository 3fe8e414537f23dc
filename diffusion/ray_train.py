"""Distributed training on Ray Train: DDP across workers fed by Ray Data, checkpoints in the
run's storage that survive worker failures and resubmission, and MLflow tracking.

    fit(config)  ->  TorchTrainer(train_loop_per_worker)  ->  ray.train.Result

The driver (fit) resolves paths, reads the held-out set, creates or reuses the MLflow run
and logs the config; the workers train, and rank 0 alone logs metrics and sample grids.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import subprocess
import tempfile
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CHECKPOINT_FILE, checkpoint_dir_name, restore_state, save_checkpoint
from .data import ShardSet, open_location
from .images import from_uint8, save_grid, to_model_input
from .speed import DeviceData, fits_on_device
from .training import HeldoutSet, TrainConfig, build_state, ddim_samples, lr_at, sample_grid, train_step

RUN_NAME_TAG = "ray_diffusion.run_name"
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


def resolve_resources(config: TrainConfig) -> TrainConfig:
    """Fill the automatic worker count, GPUs and CPUs from the connected Ray cluster."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    changes = {}
    if config.gpus_per_worker < 0:
        changes["gpus_per_worker"] = 1.0 if gpus else 0.0
    if config.num_workers == 0:
        changes["num_workers"] = max(1, int(gpus)) if gpus else 1
    if config.cpus_per_worker == 0:
        changes["cpus_per_worker"] = 1.0 if gpus else 0.5  # on CPU, a whole core per worker starves Ray Data
    config = config.replace(**changes)
    if config.batch_size % config.num_workers:
        raise ValueError(f"batch_size {config.batch_size} must divide evenly over {config.num_workers} workers")
    return config


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else MLflow's local default, made absolute so Ray workers (which
    run in other folders) write to the same store."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def _git_commit() -> str:
    """The project's commit (GIT_COMMIT where the source is not a git checkout, as under ray job submit)."""
    try:
        source = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or os.environ.get("GIT_COMMIT", "unknown")
    except OSError:
        return os.environ.get("GIT_COMMIT", "unknown")


def mlflow_experiment(client, name: str, uri: str) -> str:
    """The id of MLflow experiment `name`, created if new. A sqlite store keeps no artifacts of
    its own: they go beside the database, not into the folder each Ray worker runs in."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def mlflow_run(config: TrainConfig, uri: str, tags: dict | None = None) -> str:
    """The MLflow run of this training run: the one tagged with its name (a resume), or a new
    one with `tags`. Params are the full config; a resume that changes some (say max_steps)
    records them in a tag, as MLflow params cannot change."""
    import ray
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = mlflow_experiment(client, config.experiment, uri)
    params = {k: str(v) for k, v in config.to_dict().items()}
    found = client.search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = '{config.name}'", max_results=1)
    if found:
        run = found[0]
        changed = {k: v for k, v in params.items() if k in run.data.params and run.data.params[k] != v}
        if changed:
            client.set_tag(run.info.run_id, "resumed_with_changes", str(changed))
        client.update_run(run.info.run_id, status="RUNNING")
        run_id = run.info.run_id
    else:
        tags = {
            RUN_NAME_TAG: config.name,
            "kind": "training",
            "git_commit": _git_commit(),
            "ray_job_id": ray.get_runtime_context().get_job_id(),
            **(tags or {}),
        }
        run_id = client.create_run(experiment_id, run_name=config.name, tags=tags).info.run_id
    from mlflow.entities import Param

    missing = [Param(k, v) for k, v in params.items() if k not in client.get_run(run_id).data.params]
    for start in range(0, len(missing), 100):
        client.log_batch(run_id, params=missing[start : start + 100])
    return run_id


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


def fid_reference(config: TrainConfig, client, run_id: str):
    """For in-training FID: the data set's reference statistics (cached beside its shards) and
    the Inception weights, in the object store for the workers; the settings go to MLflow."""
    import ray

    from .batch_sample import resolve_workers
    from .evaluate import reference_stats
    from .fid import inception_weights

    weights = inception_weights(config.inception_weights or None)
    workers, gpus = resolve_workers(0, -1)
    reference = reference_stats(
        config.data,
        config.fid_splits.split("+"),
        str(weights),
        workers=workers,
        gpus_per_worker=gpus,
        endpoint_url=config.endpoint_url or None,
    )
    for key in ("n", "manifest_sha256", "weights_sha256"):
        client.set_tag(run_id, f"fid_reference_{key}", str(reference[key]))
    return ray.put({"mu": reference["mu"], "sigma": reference["sigma"], "weights": weights.read_bytes()})


def fit(config: TrainConfig, callbacks: list | None = None, mlflow_tags: dict | None = None, close_run: bool = True):
    """Train with Ray Train on the current Ray cluster (a local one is started if none is
    connected). The same name and storage resume the latest checkpoint. `callbacks` are Ray
    Train callbacks; `mlflow_tags` go on a new MLflow run (a sweep's parent, say); with
    close_run=False the caller sets the run's final status (a sweep, whose scheduler may stop it)."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = resolve_paths(config)
    shards = ShardSet.open(config.data, config.endpoint_url or None, verify="size")  # before starting Ray
    if not ray.is_initialized():
        ray.init()
    config = resolve_resources(config)
    heldout, train_splits, heldout_source = heldout_images(shards, config)
    storage = open_location(config.storage, config.endpoint_url or None)
    uri = tracking_uri()
    run_id = mlflow_run(config, uri, mlflow_tags)
    client = MlflowClient(uri)
    client.set_tag(run_id, "heldout_source", heldout_source)
    print(
        f"run {config.name}: {len(shards)} images from {config.data}, {config.num_workers} worker(s) with "
        f"{config.gpus_per_worker:g} GPU each, checkpoints in {config.storage}/{config.name}, MLflow run {run_id}",
        flush=True,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "tracking_uri": uri,
            "run_id": run_id,
            "heldout": ray.put(heldout),
            "dataset_bytes": len(shards) * math.prod(shards.manifest[k] for k in ("height", "width", "channels")),
            "fid_reference": fid_reference(config, client, run_id) if config.fid_every else None,
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
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:
        if close_run:
            client.set_terminated(run_id, status="FAILED")
        raise
    if close_run:
        client.set_terminated(run_id, status="FINISHED")
    return result


# ---------------------------------------------------------------------------- workers


class MlflowLogger:
    """Rank 0's MLflow client. A tracking-server hiccup is reported, never fatal to training."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(uri), run_id

    def metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._safe(
            self.client.log_batch, self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()]
        )

    def tag(self, key: str, value: str) -> None:
        self._safe(self.client.set_tag, self.run_id, key, value)

    def image(self, path: str, artifact_path: str) -> None:
        self._safe(self.client.log_artifact, self.run_id, path, artifact_path)

    @staticmethod
    def _safe(fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - logging must not end a long run
            log.warning("MLflow logging failed: %s: %s", type(e).__name__, e)


def _fingerprint(*models: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for model in models:
        for p in model.parameters():
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _eta(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    config = TrainConfig(**loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device()
    state = build_state(config, device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            restore_state(torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=True), state)
        if rank == 0:
            log.info(f"resumed from checkpoint at step {state.step}")
    net = prepare_model(state.model, move_to_device=False)  # DDP; every rank starts from rank 0's weights
    if config.compile:
        net = torch.compile(net)

    logger = MlflowLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    heldout = None
    if rank == 0 and checkpoint:
        logger.metrics({"resumed_from_step": state.step}, state.step)
    if rank == 0:
        images = torch.from_numpy(np.array(ray.get(loop_config["heldout"])))  # a writable copy
        heldout = HeldoutSet(from_uint8(images.permute(0, 3, 1, 2)), config.num_timesteps, config.seed)

    def report(metrics: dict, with_checkpoint: bool) -> None:
        """A barrier on every rank: metrics (rank 0's count), and a checkpoint saved by rank 0."""
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                save_checkpoint(d, state, config, mlflow_run_id=loop_config["run_id"])
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(d) if rank == 0 else None,
                checkpoint_dir_name=checkpoint_dir_name(state.step),
            )
        if rank == 0:  # lets `runs:/<run_id>` stand for the latest checkpoint (Serve, sampling jobs)
            logger.tag("checkpoint_uri", f"{config.storage}/{config.name}/{checkpoint_dir_name(state.step)}")

    def evaluate() -> dict:
        if rank != 0:
            return {}
        metrics = {
            "heldout_loss": heldout.loss(state.model, state.schedule, config),
            "heldout_loss_ema": heldout.loss(state.ema.ema_model, state.schedule, config),
        }
        logger.metrics(metrics, state.step)
        log.info(
            f"step {state.step}: held-out L_simple {metrics['heldout_loss']:.4f} (EMA {metrics['heldout_loss_ema']:.4f})"
        )
        return metrics

    fid_net = fid_reference = None
    if config.fid_every:
        import io

        from .fid import InceptionFeatures

        fid_reference = ray.get(loop_config["fid_reference"])
        fid_net = InceptionFeatures(io.BytesIO(fid_reference.pop("weights"))).to(device)

    def evaluate_fid() -> dict:
        """FID of fid_n EMA samples, their seeds spread over the ranks; statistics summed across ranks."""
        from .fid import FeatureStats, frechet_distance
        from .generate import as_uint8_hwc

        stats = FeatureStats()
        seeds = list(range(rank, config.fid_n, world))
        for start in range(0, len(seeds), per_worker):
            x = ddim_samples(state.ema.ema_model, state.schedule, config, seeds[start : start + per_worker])
            stats.add(fid_net(as_uint8_hwc(x))[0].cpu().numpy())
        if world > 1:
            sums = torch.from_numpy(np.concatenate([[stats.n], stats.sum, stats.outer.ravel()])).to(device)
            dist.all_reduce(sums)
            sums = sums.cpu().numpy()
            dim = len(stats.sum)
            stats.n, stats.sum, stats.outer = int(sums[0]), sums[1 : 1 + dim], sums[1 + dim :].reshape(dim, dim)
        if rank != 0:
            return {}
        fid = frechet_distance(stats.mu, stats.sigma, fid_reference["mu"], fid_reference["sigma"])
        logger.metrics({"fid": fid}, state.step)
        log.info(f"step {state.step}: FID {fid:.2f} ({stats.n} EMA samples, {config.sample_steps} DDIM steps)")
        return {"fid": fid}

    def log_samples() -> None:
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                path = save_grid(
                    sample_grid(state.ema.ema_model, state.schedule, config), Path(d) / f"step_{state.step:09d}.png"
                )
                logger.image(str(path), "samples")

    per_worker = config.batch_size // world
    shard = ray.train.get_dataset_shard("train")

    def ray_data_batches(batch_size: int = per_worker, drop_last: bool = True):
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            dtypes={"image": torch.uint8},
            device=device,
            drop_last=drop_last,
            local_shuffle_buffer_size=4 * batch_size,
        ):
            yield batch["image"]

    epoch = ray_data_batches
    if config.data_on_device == "on" or (
        config.data_on_device == "auto" and fits_on_device(loop_config["dataset_bytes"] // world, device)
    ):
        # One pass of this worker's Ray Data split lands on the device; later epochs reshuffle it there.
        chunks = list(ray_data_batches(4096, drop_last=False)) or [torch.empty(0, 0, 0, 0, dtype=torch.uint8)]
        cached = DeviceData(torch.cat(chunks))
        if rank == 0:
            logger.metrics({"images_on_device": len(cached)}, state.step)
            log.info(
                f"training images kept on {device}: {len(cached)} on rank 0, {cached.images.nbytes / 2**20:.0f} MiB"
            )
        epoch = partial(cached.epoch, per_worker)
    metrics: dict = evaluate() if state.step == 0 else {}
    loss_sum, window_steps, window_start = torch.zeros((), device=device), 0, time.time()
    run_start, start_step = time.time(), state.step
    while state.step < config.max_steps:
        for images in epoch():
            x0 = to_model_input(images, flip=config.flip)
            loss, grad_norm = train_step(state, net, x0, config)
            loss_sum += loss
            window_steps += 1
            step = state.step
            if step % config.log_every == 0 or step == config.max_steps:
                elapsed = time.time() - window_start
                rate = window_steps * config.batch_size / elapsed
                metrics = {
                    "loss": (loss_sum / window_steps).item(),
                    "lr": lr_at(config, step - 1),
                    "grad_norm": grad_norm.item(),
                    "images_per_s": rate,
                    "step": step,
                }
                if rank == 0:
                    logger.metrics({k: v for k, v in metrics.items() if k != "step"}, step)
                    eta = (config.max_steps - step) * (time.time() - run_start) / max(1, step - start_step)
                    log.info(
                        f"step {step}/{config.max_steps} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
                        f"grad {metrics['grad_norm']:.3f} | {rate:.0f} img/s | eta {_eta(eta)}"
                    )
                loss_sum.zero_()
                window_steps, window_start = 0, time.time()
            if step % config.eval_every == 0 or step == config.max_steps:
                metrics.update(evaluate())
            if step % config.sample_every == 0 or step == config.max_steps:
                log_samples()
            if config.fid_every and (step % config.fid_every == 0 or step == config.max_steps):
                metrics.update(evaluate_fid())
            if step % config.log_every == 0 or step % config.checkpoint_every == 0 or step == config.max_steps:
                report(
                    dict(metrics, step=step),
                    with_checkpoint=step % config.checkpoint_every == 0 or step == config.max_steps,
                )
            if step >= config.max_steps:
                break

    fingerprints = [_fingerprint(state.model, state.ema.ema_model)] * world
    if world > 1:
        dist.all_gather_object(fingerprints, fingerprints[0])
    if rank == 0:
        identical = len(set(fingerprints)) == 1
        logger.metrics({"replicas_identical": float(identical)}, state.step)
        log.info(f"done at step {state.step}: {world} replica(s), weights and EMA identical across ranks: {identical}")
