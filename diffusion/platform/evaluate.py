"""Sample-quality evaluation on a Ray cluster: features of a data set's shards or of a
checkpoint's samples, extracted by an actor pool (one feature network per GPU), reduced to
Frechet statistics on the driver; reference statistics cached beside the shards; the metrics
logged to MLflow with every setting that changes them.

The feature network (the `Judge`) is FID's Inception where its weights are given; otherwise a
classifier trained on the data set's own train split (`diffusion.classifier`): for the 8x8
digits (where ImageNet features mean little) a small CNN cached beside the shards as the
statistics are, for CIFAR-10 the ResNet-20 kept in the package:

    shards --Ray Data--> FeatureActor --> FeatureStats --> <metric>-stats-<splits>.npz (cache)
    seeds --> SampleWriter (batch_sample) --> FeatureActor --> FID / FD-digits, IS / score --> MLflow
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch

from .. import classifier, fid
from ..checkpoint import class_names
from ..digest import file_digest
from ..errors import InputError
from ..fid import FeatureStats, frechet_distance, inception_score
from ..speed import default_device
from . import tracking
from .batch_sample import SamplingJob, resolved, sample_dataset
from .progress import progress
from .resources import Workers, connect, map_with_actors, use_assigned_resources
from .shards import ShardSet

CLASSIFIER_FILE = "classifier.pt"


@dataclass(frozen=True)
class Judge:
    """The network that sees the images: uint8 (N, H, W, C) -> (features, class logits)."""

    kind: str  # "inception" or "classifier"
    metric: str  # the Frechet distance's name: "fid" or "fd_digits" (also the cache's prefix)
    score: str  # the Inception Score's formula on its classes: "is" or "classifier_score"
    score_splits: int  # splits of that score: 10 for IS (its convention), 1 for the classifier score
    build: Callable[[], torch.nn.Module]  # picklable: each actor builds its own
    dim: int  # feature dimension
    sha256: str  # of its weights: part of every cache key


def inception_judge(weights: str) -> Judge:
    """FID's Inception (the weights of `fid.inception_weights`)."""
    return Judge(
        "inception", "fid", "is", 10, partial(fid.InceptionFeatures, weights), fid.FEATURE_DIM, file_digest(weights)
    )


def classifier_judge(shards: ShardSet, split: str = "train") -> Judge:
    """FD-digits' classifier, trained on the shards' `split` once (seconds, seeded) and cached
    beside them as classifier.pt with the manifest's checksum and the recipe: a cache from
    other shards or another recipe is retrained, never used."""
    key = {"manifest_sha256": shards.digest, "split": split, "recipe": classifier.RECIPE}
    where = shards.location.join(CLASSIFIER_FILE)
    if shards.location.exists(CLASSIFIER_FILE):
        data = shards.location.read_bytes(CLASSIFIER_FILE)
        try:
            cached = torch.load(io.BytesIO(data), weights_only=True)
        except Exception:  # noqa: BLE001 - cut short or not ours: retrained like a stale one
            cached = {"key": None}
        if cached["key"] == key:
            return _classifier_judge(cached["state"], data)
        print(f"{where} is stale (other shards or recipe, or unreadable): retraining", flush=True)
    batch = next(shards.iter_batches(len(shards), splits=[split]))
    print(f"training the FD classifier on {len(batch['label'])} {split} images of {shards.location.uri}", flush=True)
    state = classifier.train_classifier(torch.tensor(batch["image"]), torch.tensor(batch["label"]))
    buf = io.BytesIO()
    torch.save({"key": key, "state": state}, buf)
    shards.location.write_bytes(CLASSIFIER_FILE + ".partial", buf.getvalue())  # complete before it is visible
    shards.location.fs.move(where + ".partial", where)
    return _classifier_judge(state, buf.getvalue())


def _classifier_judge(state: dict, data: bytes) -> Judge:
    build = partial(classifier.DigitsClassifier.from_state, state)
    sha256 = hashlib.sha256(data).hexdigest()
    return Judge(
        "classifier",
        "fd_digits",
        "classifier_score",
        classifier.CLASSIFIER_SCORE_SPLITS,
        build,
        classifier.FEATURE_DIM,
        sha256,
    )


def cifar10_judge() -> Judge:
    """The kept CIFAR-10 judge (`classifier.cifar10_judge`): FD-CIFAR10 in its features."""
    weights = classifier.CIFAR10_JUDGE
    return Judge(
        "classifier",
        "fd_cifar10",
        "classifier_score",
        classifier.CLASSIFIER_SCORE_SPLITS,
        classifier.cifar10_judge,
        classifier.FEATURE_DIM,
        file_digest(weights) if weights.is_file() else "",
    )


def is_cifar10(manifest: dict) -> bool:
    """CIFAR-10 as prepared from its archive or from an image folder of its classes, at 32x32."""
    size = (manifest["height"], manifest["width"], manifest["channels"])
    return manifest["classes"] == list(classifier.CIFAR10_CLASSES) and size == (32, 32, 3)


def own_judge(shards: ShardSet) -> Judge:
    """The classifier trained on the data set's own train split: the digits' or CIFAR-10's."""
    if shards.manifest["dataset"] == "digits":
        return classifier_judge(shards)
    if is_cifar10(shards.manifest):
        return cifar10_judge()
    raise InputError(
        f"{shards.location.uri} is neither the digits nor CIFAR-10 (32x32, its 10 classes): no classifier judges it; "
        "use FID (jobs/evaluate.py --inception-weights PATH)"
    )


def judge_for(shards: ShardSet, inception_weights: str | None = None) -> Judge:
    """The digits' own classifier for the digits; FID's Inception for other data sets, except
    CIFAR-10 where no Inception weights are at hand (none given, none in the hub cache): the
    kept ResNet-20 there, said in one line."""
    if shards.manifest["dataset"] == "digits":
        return classifier_judge(shards)
    if is_cifar10(shards.manifest) and not (inception_weights or os.environ.get("FID_INCEPTION_WEIGHTS")):
        try:
            return inception_judge(str(fid.inception_weights(download=False)))
        except fid.MissingWeights:
            print("no FID Inception weights here: CIFAR-10 is judged by the kept ResNet-20 (FD-CIFAR10, not FID)")
            judge = cifar10_judge()
            judge.build()  # a missing file fails here, before Ray starts
            return judge
    return inception_judge(str(fid.inception_weights(inception_weights)))


class FeatureActor:
    """A Ray Data actor: uint8 images -> the judge's features and logits."""

    def __init__(self, build: Callable[[], torch.nn.Module]):
        use_assigned_resources()
        self.net = build().to(default_device())

    def __call__(self, batch: dict) -> dict:
        features, logits = self.net(torch.from_numpy(batch["image"]))
        labels = {"label": batch["label"]} if "label" in batch else {}  # what samples were asked for
        return {"features": features.cpu().numpy(), "logits": logits.cpu().numpy(), **labels}


def extract(
    ds, total: int, what: str, judge: Judge, batch_size: int, workers: Workers
) -> tuple[FeatureStats, np.ndarray, np.ndarray | None]:
    """Feature statistics, logits and labels (where `ds` has a "label" column) of every image of
    `ds` (a dataset with an "image" column of `total` images of `what`)."""
    stats, logits, labels = FeatureStats(judge.dim), [], []
    features = map_with_actors(ds, FeatureActor, (judge.build,), batch_size, workers.resolve())
    with progress(total, f"{judge.kind} features of {what}", unit="img") as bar:
        for batch in features.iter_batches(batch_size=None, batch_format="numpy"):
            stats.add(batch["features"])
            logits.append(batch["logits"])
            labels.extend(batch.get("label", []))
            bar.update(len(batch["features"]))
    return stats, np.concatenate(logits), np.asarray(labels) if labels else None


def reference_stats(
    shards: ShardSet, splits: list[str] | None, judge: Judge, batch_size: int = 200, workers: Workers = Workers()
) -> dict:
    """Frechet statistics of a prepared data set's splits (None: all), computed once and cached
    beside its shards as <metric>-stats-<splits>.npz with the manifest's and the judge's
    checksums: a cache from other shards or other weights is recomputed, never used."""
    splits = sorted(splits or shards.manifest["splits"])
    name = f"{judge.metric.replace('_', '-')}-stats-{'+'.join(splits)}.npz"
    key = {"manifest_sha256": shards.digest, "weights_sha256": judge.sha256, "splits": splits}
    if shards.location.exists(name):
        cached = dict(np.load(io.BytesIO(shards.location.read_bytes(name))))
        if json.loads(str(cached["key"])) == key:
            return {"mu": cached["mu"], "sigma": cached["sigma"], "n": int(cached["n"]), **key, "cached": True}
        print(f"{shards.location.join(name)} is stale (other shards or weights): recomputing", flush=True)
    images = shards.ray_dataset(splits=splits, columns=["image"])
    total = sum(s["rows"] for s in shards.manifest["shards"]) if splits == sorted(shards.manifest["splits"]) else None
    what = f"{shards.location.uri} ({'+'.join(splits)})"
    stats, _, _ = extract(images, total, what, judge, batch_size, workers)
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mu, sigma=stats.sigma, n=stats.n, key=json.dumps(key))
    shards.location.write_bytes(name + ".partial", buf.getvalue())  # complete before it is visible
    shards.location.fs.move(shards.location.join(name + ".partial"), shards.location.join(name))
    return {"mu": stats.mu, "sigma": stats.sigma, "n": stats.n, **key, "cached": False}


def evaluate(
    job: SamplingJob,
    data: str,
    splits: list[str] | None = None,
    inception_weights: str | None = None,
    out: str | None = None,
) -> dict:
    """The job's samples against the reference statistics of `data`'s `splits`: FID and IS
    (Inception), or for the digits FD-digits, the classifier score, the share of confidently
    classified samples and the floor (the test split against the reference); logged to an
    MLflow run linked to the training run. Returns the results and settings."""
    payload = job.read()  # bad input fails before Ray starts
    job = resolved(job, payload)
    shards = ShardSet.open(data, job.endpoint_url, verify="size")
    judge = judge_for(shards, inception_weights)
    connect()
    job = replace(job, workers=job.workers.resolve())
    start = time.time()
    ref = reference_stats(shards, splits, judge, job.batch_size, job.workers)
    samples = sample_dataset(job, out)
    stats, logits, labels = extract(samples, job.n, f"{job.n} samples", judge, job.batch_size, job.workers)
    score_mean, score_std = inception_score(logits, judge.score_splits)
    metrics = {
        judge.metric: frechet_distance(stats.mu, stats.sigma, ref["mu"], ref["sigma"]),
        f"{judge.score}_mean": score_mean,
        f"{judge.score}_std": score_std,
    }
    if judge.kind == "classifier":
        metrics["confident_share"] = classifier.confident_share(torch.from_numpy(logits))
        shares = dict(zip(shards.manifest["classes"], classifier.class_shares(torch.from_numpy(logits))))
        metrics |= {"class_share_min": min(shares.values()), "class_share_max": max(shares.values())}
        metrics |= {f"class_share.{name}": share for name, share in shares.items()}
        if (
            job.labels is not None and class_names(payload) == shards.manifest["classes"]
        ):  # asked of the judge's classes
            agreement, per_class = classifier.class_agreement(torch.from_numpy(logits), torch.from_numpy(labels))
            metrics["class_agreement"] = agreement
            asked = set(job.labels)
            metrics |= {
                f"class_agreement.{name}": share
                for c, (name, share) in enumerate(zip(shards.manifest["classes"], per_class))
                if c in asked
            }
        if "test" in shards.manifest["splits"] and "test" not in ref["splits"]:
            real = reference_stats(shards, ["test"], judge, job.batch_size, job.workers)
            metrics[f"{judge.metric}_floor"] = frechet_distance(real["mu"], real["sigma"], ref["mu"], ref["sigma"])
    metrics["seconds"] = time.time() - start
    params = {
        **job.params(),
        "n": stats.n,
        "checkpoint_step": payload["step"],
        "reference_data": data,
        "reference_splits": "+".join(ref["splits"]),
        "reference_n": ref["n"],
        "reference_cached": ref["cached"],
        "reference_manifest_sha256": ref["manifest_sha256"],
        f"{judge.kind}_weights_sha256": ref["weights_sha256"],
    }
    results = {"metric": judge.metric, **metrics, **params}
    T = len(payload["betas"])
    tags = {"kind": "evaluation", "training_run_id": payload.get("mlflow_run_id", "")}
    run = tracking.Run.create(job.experiment, f"{judge.metric}-{job.settings.label(T)}-{stats.n}", tags, params)
    run.log_metrics(metrics)
    run.log_text(json.dumps(results, indent=2), "evaluation.json")
    run.finish()
    return {**results, "mlflow_run_id": run.id}
