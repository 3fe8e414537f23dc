"""Everything MLflow: the tracking store, experiments, runs and what they hold. Nothing else in
the package imports mlflow.

The store is MLFLOW_TRACKING_URI, else MLflow's local default (./mlflow.db). A sqlite store
keeps no artifacts of its own: an experiment created here puts them in `mlruns/` beside the
database (an absolute path), not in whatever folder a Ray worker happens to run in. Experiments
are marked for model training (EXPERIMENT_KIND_TAG), so that MLflow's UI opens its training view
rather than its GenAI one.

Runs are tagged `kind` (training, sampling, evaluation, sweep) and with MLflow's standard
source tags (mlflow.source.git.commit, .name, .type, mlflow.user); a training run also carries
its run name (RUN_NAME_TAG; a resumed run finds its MLflow run by the id its run folder
records, `diffusion.platform.run_folder`), and the URI of its latest checkpoint (CHECKPOINT_TAG), which `runs:/<run_id>` stands for. A finished
training run logs its final and its best weights as MLflow Models (`SamplerModel`: a pyfunc
that samples images) at their checkpoints' steps, each with the run's metrics of its step, which
the Model Registry can hold.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.utils import mlflow_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from .. import classes
from ..checkpoint import CheckpointError, read_checkpoint
from ..config import SamplerSettings
from ..errors import OptionError
from ..pipeline import Pipeline, as_uint8_hwc
from .logs import PROJECT_LOGGER

RUN_NAME_TAG = "ray_diffusion.run_name"
SWEEP_TAG = "ray_diffusion.sweep"
CHECKPOINT_TAG = "checkpoint_uri"
MODEL_NAMES = {"final": "model", "best": "best"}  # the logged models of a training run, and their aliases
# MLflow 3's experiment kind, which its UI opens an experiment by: the training view, not the GenAI one.
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
log = logging.getLogger(PROJECT_LOGGER)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else MLflow's local default, made absolute so Ray workers (which
    run in other folders) write to the same store. The environment comes first: MLflow's own
    notion (mlflow.get_tracking_uri()) keeps whatever store a model was last logged to."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def client(uri: str | None = None):
    return MlflowClient(uri or tracking_uri())


def experiment_id(name: str, uri: str | None = None) -> str:
    """The id of MLflow experiment `name`, created if new (sqlite: artifacts beside the database),
    marked for model training unless it has a kind already."""
    uri = uri or tracking_uri()
    mlflow = client(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            mlflow.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})


def source_tags() -> dict:
    """MLflow's standard tags for where a run comes from (the fluent API sets them; clients don't)."""
    return {
        mlflow_tags.MLFLOW_GIT_COMMIT: git_commit(),
        mlflow_tags.MLFLOW_SOURCE_NAME: Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
        mlflow_tags.MLFLOW_SOURCE_TYPE: "JOB",
        mlflow_tags.MLFLOW_USER: getpass.getuser(),
    }


def git_commit() -> str:
    """The project's commit (GIT_COMMIT where the source is not a git checkout, as under ray job submit)."""
    try:
        source = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=10
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
        tags = {**source_tags(), **tags}
        run_id = client(uri).create_run(experiment_id(experiment, uri), run_name=name, tags=tags).info.run_id
        run = cls(run_id, uri)
        run.log_params(params or {})
        return run

    @classmethod
    def get(cls, run_id: str) -> Run | None:
        """MLflow run `run_id` of this tracking store, if it has one."""
        uri = tracking_uri()
        try:
            client(uri).get_run(run_id)
        except MlflowException:
            return None
        return cls(run_id, uri)

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
        existing = self.client.get_run(self.id).data.params
        missing = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for start in range(0, len(missing), 100):
            self._call(self.client.log_batch, self.id, params=missing[start : start + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._call(self.client.log_batch, self.id, metrics=values)

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self._call(self.client.set_tag, self.id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(self.client.log_artifact, self.id, str(path), artifact_path)

    def log_image(self, image: np.ndarray, key: str, step: int = 0) -> None:
        """An image (uint8 H x W x C) under `key` at `step`: the MLflow UI steps through them."""
        self._call(self.client.log_image, self.id, image, key=key, step=step)

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

    def page(self) -> str:
        """Where the MLflow UI shows this run, in its training view: a URL with a tracking server;
        else the `mlflow ui` command that serves the store, and the URL it then answers at."""
        route = run_page(self.client.get_run(self.id).info.experiment_id, self.id)
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/{route}"
        return f"mlflow ui --backend-store-uri {self.uri}, then open http://127.0.0.1:5000/{route}"


def run_page(experiment: str, run_id: str, tab: str = "") -> str:
    """The MLflow UI's route to a run (or to `tab` of its page, e.g. artifacts/<path>), in the
    training view whichever view the browser last showed."""
    return f"#/experiments/{experiment}/runs/{run_id}{'/' + tab if tab else ''}?workflowType=machine_learning"


def training_run(job, tags: dict | None = None, resumed_run_id: str | None = None) -> Run:
    """The MLflow run of a training run (a TrainJob): `resumed_run_id`, the one its run folder
    recorded, where it resumes, else a new one with `tags`. Params are every option, recipe and
    run settings; a resume that changes some (say max_steps) records them in a tag, as MLflow
    params cannot change."""
    import ray  # here, not above: a logged model loads with MLflow alone

    params = {k: str(v) for k, v in job.to_dict().items()}
    experiment, name = job.settings.experiment, job.settings.name
    run = Run.get(resumed_run_id) if resumed_run_id else None
    if resumed_run_id and run is None:
        print(f"MLflow run {resumed_run_id} of this run is not in {tracking_uri()}: a new MLflow run continues it")
    if run is not None:
        logged = run.params
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
        if changed:
            run.set_tags({"resumed_with_changes": changed})
        run.reopen()
    else:
        tags = {
            RUN_NAME_TAG: name,
            "kind": "training",
            "ray_job_id": ray.get_runtime_context().get_job_id(),
            **(tags or {}),
        }
        run = Run.create(experiment, name, tags)
    run.log_params(params)
    return run


def checkpoint_of_run(run_id: str) -> str:
    """The latest checkpoint URI a training run recorded (what `runs:/<run_id>` stands for)."""
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


def log_dataset(run: Run, name: str, uri: str, manifest_sha256: str, count: int, splits: list[str]) -> None:
    """The splits trained on as the run's input, named `name/split+split`: the data set's URI,
    its manifest's checksum (MLflow keeps 36 characters of a digest: the whole is a tag) and the
    count of the images trained on (not the whole data set's, which holds the held-out split)."""
    source_type = "s3" if uri.startswith("s3://") else "local"
    dataset = Dataset(
        f"{name}/{'+'.join(splits)}",
        manifest_sha256[:36],
        source_type,
        json.dumps({"uri": uri}),
        profile=json.dumps({"num_rows": count}),
    )
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, "training"), InputTag("manifest_sha256", manifest_sha256)]
    tags.append(InputTag("splits", "+".join(splits)))
    run._call(run.client.log_inputs, run.id, datasets=[DatasetInput(dataset, tags=tags)])


def system_metrics(run: Run, node: str):
    """A started monitor logging this machine's CPU, memory, disk, network (and GPU, with
    nvidia-ml-py) to the run as system/... metrics every 10 s; `.finish()` stops it."""
    monitor = SystemMetricsMonitor(run.id, node_id=node, tracking_uri=run.uri, resume_logging=True)
    monitor.start()
    return monitor


# ---------------------------------------------------------------------------- models


class SamplerModel(mlflow.pyfunc.PythonModel):
    """A checkpoint as an MLflow Model: `predict` takes a DataFrame with a `seed` column (one
    image a row) and, for a class-conditional model, an optional `class` column (each row's class,
    by name or index; default: seed mod K), and sampler params (guidance among them); it returns
    the images, uint8 (N, H, W, C).

        model = mlflow.pyfunc.load_model("models:/cifar10/1")
        images = model.predict(pd.DataFrame({"seed": range(8)}), params={"sampler": "ddim", "steps": 50})
        cats = model.predict(pd.DataFrame({"seed": range(8), "class": "cat"}), params={"guidance_scale": 3.0})
    """

    def load_context(self, context) -> None:
        self.pipeline = Pipeline.from_checkpoint(read_checkpoint(context.artifacts["checkpoint"]), batch_size=16)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        params = {**PARAM_DEFAULTS, **(params or {})}
        values = {name: params[name] for name in PARAM_DEFAULTS}
        values["clip"] = {"": None, "true": True, "false": False}[str(values["clip"]).lower()]
        values["variance"] = values["variance"] or None
        for name, none in NONE_PARAMS.items():
            values[name] = None if int(values[name]) == none else int(values[name])
        settings = SamplerSettings(**values)
        seeds = [int(seed) for seed in model_input["seed"]]
        labels = None
        if self.pipeline.num_classes:
            asked = model_input["class"].tolist() if "class" in model_input else [None] * len(seeds)
            labels = [  # a missing class (None, or NaN once MLflow's schema has read the column): seed mod K
                seed % self.pipeline.num_classes if pd.isna(c) else classes.resolve([str(c)], self.pipeline.classes)[0]
                for seed, c in zip(seeds, asked)
            ]
        elif "class" in model_input:
            raise OptionError(classes.UNCONDITIONAL)
        return as_uint8_hwc(self.pipeline.samples(seeds, settings, classes=labels)).numpy()


# The params of SamplerModel.predict that stand for None (the checkpoint's defaults, DDIM's steps, no
# guidance interval): "" for a text, and these values for the integers.
NONE_PARAMS = {"steps": 0, "guidance_max_t": -1}
# The sampler params of SamplerModel.predict: SamplerSettings'.
PARAM_DEFAULTS = {
    f.name: f.default if f.default is not None else NONE_PARAMS.get(f.name, "") for f in fields(SamplerSettings)
}
# A logged model is code, not a pickle (MLflow's "models from code"): this file builds it on load.
MODEL_CODE = (
    "import mlflow\nfrom diffusion.platform.tracking import SamplerModel\n\nmlflow.models.set_model(SamplerModel())\n"
)


def log_model(run: Run, checkpoint: Path, name: str, image_shape: tuple[int, int, int], step: int = 0) -> str:
    """Log the checkpoint file `checkpoint` (a payload without optimizer state) as the MLflow
    Model `name` of `run`, with its signature and requirements and this package's code, so
    that mlflow.pyfunc.load_model() works wherever MLflow, torch and numpy are installed. The
    model is linked to the run at the checkpoint's `step`, and MLflow copies the run's metrics
    of that step (the held-out losses of the checkpoint) into it."""
    types = {str: "string", int: "integer", float: "double"}
    signature = ModelSignature(
        inputs=Schema([ColSpec("long", "seed"), ColSpec("string", "class", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape))]),
        params=ParamSchema([ParamSpec(k, types[type(v)], v) for k, v in PARAM_DEFAULTS.items()]),
    )
    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"mlflow=={mlflow.__version__}",
    ]
    code = checkpoint.parent / "sampler_model.py"
    code.write_text(MODEL_CODE)
    # Model.log files the model under the fluent API's store and experiment: the run's own, so
    # that runs:/<run id>/<name> finds it.
    mlflow.set_tracking_uri(run.uri)
    mlflow.set_experiment(experiment_id=run.client.get_run(run.id).info.experiment_id)
    with warnings.catch_warnings(), _env(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):  # no bar per local copy
        warnings.filterwarnings("ignore", message=".*input example was not provided")  # none: it would be sampled
        info = Model.log(
            artifact_path=None,
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run.id,
            python_model=str(code),
            artifacts={"checkpoint": str(checkpoint)},
            signature=signature,
            pip_requirements=requirements,
            code_paths=[str(Path(__file__).resolve().parents[1])],  # the diffusion package
            step=step,
        )
    return info.model_uri


@contextmanager
def _env(**values: str):
    """Environment variables set for the duration of a block, then restored."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_registry(uri: str | None = None) -> None:
    """An OptionError naming the fix unless the tracking store has a Model Registry."""
    uri = uri or tracking_uri()
    try:
        client(uri).search_registered_models(max_results=1)
    except MlflowException as e:
        raise OptionError(
            f"--register-model needs a Model Registry, which the tracking store {uri} does not provide "
            f"({e.message.splitlines()[0][:120]}): use a database store (MLFLOW_TRACKING_URI=sqlite:///mlflow.db) "
            "or a tracking server"
        ) from None


def register(name: str, alias: str, model_uri: str, version: int | None = None) -> int:
    """Point `alias` of registered model `name` at `version`, or at a new version registered
    from the logged model `model_uri`; the version."""
    if version is None:
        mlflow.set_registry_uri(tracking_uri())  # the fluent registry keeps the first store it saw otherwise
        version = int(mlflow.register_model(model_uri, name).version)
    client().set_registered_model_alias(name, alias, version)
    return version


def download(uri: str, dst: str) -> Path:
    """The artifacts behind a runs:/ or models:/ URI, downloaded into `dst`; a CheckpointError
    naming the URI and what to check when there are none."""
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=tracking_uri()))
    except MlflowException as e:
        first = e.message.splitlines()[0][:160].rstrip(".")
        fix = (
            "list the model's versions and aliases in the MLflow UI or with MlflowClient().search_model_versions()"
            if uri.startswith("models:/")
            else "check the run id and the artifact path (runs:/<run id>/model or /best for its logged models)"
        )
        raise CheckpointError(f"{uri}: {first} in the MLflow store {tracking_uri()}; {fix}") from None
