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
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..checkpoint import read_checkpoint
from ..digest import file_digest
from ..fid import FeatureStats, InceptionFeatures, frechet_distance, inception_score
from ..speed import default_device
from . import tracking
from .batch_sample import SamplingJob, resolved, sample_dataset
from .resources import Workers, connect, map_with_actors
from .shards import ShardSet


@dataclass(frozen=True)
class Reference:
    """The real images samples are compared with: splits of a prepared data set, seen through
    the FID Inception weights in `weights`."""

    data: str
    splits: list[str] | None  # None: every split
    weights: str
    endpoint_url: str | None = None


class InceptionActor:
    """A Ray Data actor: uint8 images -> 2048-d pool features and 1008 logits."""

    def __init__(self, weights: str):
        self.net = InceptionFeatures(weights).to(default_device())

    def __call__(self, batch: dict) -> dict:
        pool, logits = self.net(torch.from_numpy(batch["image"]))
        return {"pool": pool.cpu().numpy(), "logits": logits.cpu().numpy()}


def extract(ds, weights: str, batch_size: int, workers: Workers) -> tuple[FeatureStats, np.ndarray]:
    """Feature statistics and logits of every image of `ds` (a dataset with an "image" column)."""
    stats, logits = FeatureStats(), []
    features = map_with_actors(ds, InceptionActor, (str(weights),), batch_size, workers.resolve())
    for batch in features.iter_batches(batch_size=None, batch_format="numpy"):
        stats.add(batch["pool"])
        logits.append(batch["logits"])
    return stats, np.concatenate(logits)


def manifest_sha256(shards: ShardSet) -> str:
    return hashlib.sha256(json.dumps(shards.manifest, sort_keys=True).encode()).hexdigest()


def reference_stats(reference: Reference, batch_size: int = 200, workers: Workers = Workers()) -> dict:
    """FID statistics of a prepared data set's splits, computed once and cached beside its
    shards as fid-stats-<splits>.npz with the manifest's and the weights' checksums: a cache
    from other shards or other weights is recomputed, never used."""
    shards = ShardSet.open(reference.data, reference.endpoint_url, verify="size")
    splits = sorted(reference.splits or shards.manifest["splits"])
    name = f"fid-stats-{'+'.join(splits)}.npz"
    key = {
        "manifest_sha256": manifest_sha256(shards),
        "weights_sha256": file_digest(reference.weights),
        "splits": splits,
    }
    if shards.location.exists(name):
        cached = dict(np.load(io.BytesIO(shards.location.read_bytes(name))))
        if json.loads(str(cached["key"])) == key:
            return {"mu": cached["mu"], "sigma": cached["sigma"], "n": int(cached["n"]), **key, "cached": True}
        print(f"{shards.location.join(name)} is stale (other shards or weights): recomputing", flush=True)
    images = shards.ray_dataset(splits=splits, columns=["image"])
    stats, _ = extract(images, reference.weights, batch_size, workers)
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mu, sigma=stats.sigma, n=stats.n, key=json.dumps(key))
    shards.location.write_bytes(name + ".partial", buf.getvalue())  # complete before it is visible
    shards.location.fs.move(shards.location.join(name + ".partial"), shards.location.join(name))
    return {"mu": stats.mu, "sigma": stats.sigma, "n": stats.n, **key, "cached": False}


def evaluate(job: SamplingJob, reference: Reference, out: str | None = None, experiment: str = "ray-diffusion") -> dict:
    """FID and IS of the job's samples against the reference statistics, logged to an MLflow
    run (linked to the training run); returns the results and settings."""
    payload = read_checkpoint(job.checkpoint, job.endpoint_url)  # a bad checkpoint fails before Ray starts
    job = resolved(job, payload)
    ShardSet.open(reference.data, reference.endpoint_url, verify="size")
    connect()
    job = replace(job, workers=job.workers.resolve())
    start = time.time()
    ref = reference_stats(reference, job.batch_size, job.workers)
    stats, logits = extract(sample_dataset(job, out), reference.weights, job.batch_size, job.workers)
    fid = frechet_distance(stats.mu, stats.sigma, ref["mu"], ref["sigma"])
    is_mean, is_std = inception_score(logits)
    metrics = {"fid": fid, "is_mean": is_mean, "is_std": is_std, "seconds": time.time() - start}
    params = {
        **job.params(),
        "n": stats.n,
        "checkpoint_step": payload["step"],
        "reference_data": reference.data,
        "reference_splits": "+".join(ref["splits"]),
        "reference_n": ref["n"],
        "reference_cached": ref["cached"],
        "reference_manifest_sha256": ref["manifest_sha256"],
        "inception_weights_sha256": ref["weights_sha256"],
    }
    results = {**metrics, **params}
    T = len(payload["betas"])
    tags = {"kind": "evaluation", "training_run_id": payload.get("mlflow_run_id", "")}
    run = tracking.Run.create(experiment, f"fid-{job.settings.label(T)}-{stats.n}", tags, params)
    run.log_metrics(metrics)
    run.log_text(json.dumps(results, indent=2), "evaluation.json")
    run.finish()
    return {**results, "mlflow_run_id": run.id}
