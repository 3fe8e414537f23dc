"""Everything MLflow: the tracking store, experiments, runs and what they hold. Nothing else in
the package imports mlflow.

The store is MLFLOW_TRACKING_URI, else MLflow's local default (./mlflow.db). A sqlite store
keeps no artifacts of its own: an experiment created here puts them in `mlruns/` beside the
database (an absolute path), not in whatever folder a Ray worker happens to run in.

Runs are tagged `kind` (training, sampling, evaluation, sweep); a training run also carries
its run name (RUN_NAME_TAG), which is how a resumed run finds its MLflow run again, and the
URI of its latest checkpoint (CHECKPOINT_TAG), which `runs:/<run_id>` stands for.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

RUN_NAME_TAG = "ray_diffusion.run_name"
SWEEP_TAG = "ray_diffusion.sweep"
CHECKPOINT_TAG = "checkpoint_uri"
log = logging.getLogger("ray_diffusion")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else MLflow's local default, made absolute so Ray workers (which
    run in other folders) write to the same store."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri or tracking_uri())


def experiment_id(name: str, uri: str | None = None) -> str:
    """The id of MLflow experiment `name`, created if new (sqlite: artifacts beside the database)."""
    uri = uri or tracking_uri()
    mlflow = client(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    """The project's commit (GIT_COMMIT where the source is not a git checkout, as under ray job submit)."""
    try:
        source = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or os.environ.get("GIT_COMMIT", "unknown")
    except OSError:
        return os.environ.get("GIT_COMMIT", "unknown")


class Run:
    """One MLflow run, written through a client. With `safe`, a failing tracking server is a
    warning in the log, never an error (a long training run must not die of it)."""

    def __init__(self, run_id: str, uri: str | None = None, safe: bool = False):
        self.id, self.uri, self.safe = run_id, uri or tracking_uri(), safe
        self.client = client(self.uri)

    @classmethod
    def create(cls, experiment: str, name: str, tags: dict, params: dict | None = None) -> Run:
        uri = tracking_uri()
        run_id = client(uri).create_run(experiment_id(experiment, uri), run_name=name, tags=tags).info.run_id
        run = cls(run_id, uri)
        run.log_params(params or {})
        return run

    @classmethod
    def find(cls, experiment: str, where: str) -> Run | None:
        """The first run of `experiment` matching the MLflow search filter `where`, if any."""
        uri = tracking_uri()
        found = client(uri).search_runs([experiment_id(experiment, uri)], where, max_results=1)
        return cls(found[0].info.run_id, uri) if found else None

    def _call(self, fn, *args, **kwargs) -> None:
        if not self.safe:
            fn(*args, **kwargs)
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - logging must not end a long run
            log.warning("MLflow logging failed: %s: %s", type(e).__name__, e)

    def log_params(self, params: dict) -> None:
        """Params not yet on the run, as strings, in batches of 100 (MLflow's limit)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.id).data.params
        missing = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for start in range(0, len(missing), 100):
            self._call(self.client.log_batch, self.id, params=missing[start : start + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._call(self.client.log_batch, self.id, metrics=values)

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self._call(self.client.set_tag, self.id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(self.client.log_artifact, self.id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self._call(self.client.log_text, self.id, text, name)

    def finish(self, status: str = "FINISHED") -> None:
        self._call(self.client.set_terminated, self.id, status=status)

    def reopen(self) -> None:
        self._call(self.client.update_run, self.id, status="RUNNING")

    @property
    def params(self) -> dict:
        return self.client.get_run(self.id).data.params

    @property
    def tags(self) -> dict:
        return self.client.get_run(self.id).data.tags

    @property
    def status(self) -> str:
        return self.client.get_run(self.id).info.status


def training_run(config, tags: dict | None = None) -> Run:
    """The MLflow run of a training run (a TrainConfig): the one tagged with its name (a
    resume), or a new one with `tags`. Params are the full config; a resume that changes some
    (say max_steps) records them in a tag, as MLflow params cannot change."""
    import ray

    params = {k: str(v) for k, v in config.to_dict().items()}
    run = Run.find(config.experiment, f"tags.`{RUN_NAME_TAG}` = '{config.name}'")
    if run is not None:
        logged = run.params
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
        if changed:
            run.set_tags({"resumed_with_changes": changed})
        run.reopen()
    else:
        tags = {
            RUN_NAME_TAG: config.name,
            "kind": "training",
            "git_commit": git_commit(),
            "ray_job_id": ray.get_runtime_context().get_job_id(),
            **(tags or {}),
        }
        run = Run.create(config.experiment, config.name, tags)
    run.log_params(params)
    return run


def checkpoint_of_run(run_id: str) -> str:
    """The latest checkpoint URI a training run recorded (what `runs:/<run_id>` stands for)."""
    from mlflow.exceptions import MlflowException

    from ..checkpoint import CheckpointError

    try:
        tag = client().get_run(run_id).data.tags.get(CHECKPOINT_TAG)
    except MlflowException as e:
        raise CheckpointError(
            f"runs:/{run_id}: no such MLflow run in {tracking_uri()} ({e.message}); check the id and MLFLOW_TRACKING_URI"
        ) from None
    if not tag:
        raise CheckpointError(f"MLflow run {run_id} has no {CHECKPOINT_TAG} tag: it has not checkpointed yet")
    return tag


def runs_of(experiment: str, where: str) -> list[Run]:
    """Every run of `experiment` matching the MLflow search filter `where`."""
    uri = tracking_uri()
    return [Run(r.info.run_id, uri) for r in client(uri).search_runs([experiment_id(experiment, uri)], where)]
