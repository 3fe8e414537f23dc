"""Sample-quality evaluation on a Ray cluster: Inception features of a data set's shards or of
a checkpoint's samples, extracted by an actor pool (one Inception per GPU), reduced to FID
statistics on the driver; reference statistics cached beside the shards; FID and IS logged to
MLflow with every setting that changes them.

    shards --Ray Data--> InceptionActor --> FeatureStats --> fid-stats-<splits>.npz (cache)
    seeds --> SampleWriter (batch_sample) --> InceptionActor --> FID vs the cache, IS --> MLflow
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict

import numpy as np
import torch

from .checkpoint import read_checkpoint
from .data import ShardSet
from .fid import FeatureStats, InceptionFeatures, file_sha256, frechet_distance, inception_score
from .generate import SamplerSettings
from .speed import SamplerSpeed


class InceptionActor:
    """A Ray Data actor: uint8 images -> 2048-d pool features and 1008 logits."""

    def __init__(self, weights: str):
        self.net = InceptionFeatures(weights).to("cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, batch: dict) -> dict:
        pool, logits = self.net(torch.from_numpy(batch["image"]))
        return {"pool": pool.cpu().numpy(), "logits": logits.cpu().numpy()}


def extract(ds, weights: str, batch_size: int, workers: int, gpus_per_worker: float) -> tuple[FeatureStats, np.ndarray]:
    """Feature statistics and logits of every image of `ds` (a dataset with an "image" column)."""
    import ray

    features = ds.map_batches(
        InceptionActor,
        fn_constructor_args=(str(weights),),
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=gpus_per_worker,
        num_cpus=0.5 if not gpus_per_worker else 1,
        compute=ray.data.ActorPoolStrategy(size=workers),
    )
    stats, logits = FeatureStats(), []
    for batch in features.iter_batches(batch_size=None, batch_format="numpy"):
        stats.add(batch["pool"])
        logits.append(batch["logits"])
    return stats, np.concatenate(logits)


def manifest_sha256(shards: ShardSet) -> str:
    return hashlib.sha256(json.dumps(shards.manifest, sort_keys=True).encode()).hexdigest()


def reference_stats(
    data: str,
    splits: list[str] | None,
    weights: str,
    batch_size: int = 200,
    workers: int = 1,
    gpus_per_worker: float = 0,
    endpoint_url: str | None = None,
) -> dict:
    """FID statistics of a prepared data set's `splits` (default: all), computed once and cached
    beside its shards as fid-stats-<splits>.npz with the manifest's and the weights' checksums:
    a cache from other shards or other weights is recomputed, never used."""
    shards = ShardSet.open(data, endpoint_url, verify="size")
    splits = sorted(splits or shards.manifest["splits"])
    name = f"fid-stats-{'+'.join(splits)}.npz"
    key = {"manifest_sha256": manifest_sha256(shards), "weights_sha256": file_sha256(weights), "splits": splits}
    if shards.location.exists(name):
        cached = dict(np.load(io.BytesIO(shards.location.read_bytes(name))))
        if json.loads(str(cached["key"])) == key:
            return {"mu": cached["mu"], "sigma": cached["sigma"], "n": int(cached["n"]), **key, "cached": True}
        print(f"{shards.location.join(name)} is stale (other shards or weights): recomputing", flush=True)
    stats, _ = extract(
        shards.ray_dataset(splits=splits, columns=["image"]), weights, batch_size, workers, gpus_per_worker
    )
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mu, sigma=stats.sigma, n=stats.n, key=json.dumps(key))
    shards.location.write_bytes(name + ".partial", buf.getvalue())  # complete before it is visible
    shards.location.fs.move(shards.location.join(name + ".partial"), shards.location.join(name))
    return {"mu": stats.mu, "sigma": stats.sigma, "n": stats.n, **key, "cached": False}


def evaluate(
    checkpoint: str,
    n: int,
    settings: SamplerSettings,
    data: str,
    splits: list[str] | None,
    weights: str,
    ema: bool = True,
    seed: int = 0,
    batch_size: int = 100,
    workers: int = 0,
    gpus_per_worker: float = -1,
    out: str | None = None,
    endpoint_url: str | None = None,
    experiment: str = "ray-diffusion",
    speed: SamplerSpeed = SamplerSpeed(),
) -> dict:
    """FID and IS of n samples of `checkpoint` against the data set's reference statistics,
    logged to an MLflow run (linked to the training run); returns the results and settings."""
    import ray
    from mlflow.tracking import MlflowClient

    from .batch_sample import resolve_workers, sample_dataset
    from .ray_train import mlflow_experiment, tracking_uri

    if not ray.is_initialized():
        ray.init()
    workers, gpus_per_worker = resolve_workers(workers, gpus_per_worker)
    payload = read_checkpoint(checkpoint, endpoint_url)
    start = time.time()
    reference = reference_stats(data, splits, weights, batch_size, workers, gpus_per_worker, endpoint_url)
    samples = sample_dataset(
        checkpoint, n, settings, out, seed, "npz", batch_size, workers, gpus_per_worker, endpoint_url, ema, speed
    )
    stats, logits = extract(samples, weights, batch_size, workers, gpus_per_worker)
    fid = frechet_distance(stats.mu, stats.sigma, reference["mu"], reference["sigma"])
    is_mean, is_std = inception_score(logits)
    results = {
        "fid": fid,
        "is_mean": is_mean,
        "is_std": is_std,
        "n": stats.n,
        "weights": "ema" if ema else "raw",
        **asdict(settings),
        **asdict(speed),
        "seed": seed,
        "checkpoint": checkpoint,
        "checkpoint_step": payload["step"],
        "reference_data": data,
        "reference_splits": "+".join(reference["splits"]),
        "reference_n": reference["n"],
        "reference_cached": reference["cached"],
        "reference_manifest_sha256": reference["manifest_sha256"],
        "inception_weights_sha256": reference["weights_sha256"],
        "seconds": time.time() - start,
    }
    uri = tracking_uri()
    client = MlflowClient(uri)
    tags = {"kind": "evaluation", "training_run_id": payload.get("mlflow_run_id", "")}
    run_name = f"fid-{settings.sampler}-{settings.steps if settings.sampler == 'ddim' else 1000}-{stats.n}"
    run_id = client.create_run(mlflow_experiment(client, experiment, uri), run_name=run_name, tags=tags).info.run_id
    for key in ("fid", "is_mean", "is_std", "seconds"):
        client.log_metric(run_id, key, results[key])
    for key, value in results.items():
        if key not in ("fid", "is_mean", "is_std", "seconds"):
            client.log_param(run_id, key, value)
    client.log_text(run_id, json.dumps(results, indent=2), "evaluation.json")
    client.set_terminated(run_id, "FINISHED")
    return {**results, "mlflow_run_id": run_id}
