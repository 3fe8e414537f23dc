"""Ray Tune sweeps over the training of `diffusion.platform.ray_train`, compared in MLflow.

    run_sweep(base, space, SweepConfig(...))  ->  Tuner(trial)  ->  per trial: ray_train.Training(job).fit() on Ray Train

Ray Train V2 (the default in Ray 2.60) no longer runs a Trainer as a Tune trainable
(`Tuner(trainer)` raises). Its documented pattern is the one used here: each trial is a
function that builds and fits a TorchTrainer whose `TuneReportCallback` forwards rank 0's
reports to Tune, so ASHA sees the held-out L_simple as training goes, and each trial keeps
the full training path: Ray Data input, multi-worker DDP, checkpoints, MLflow curves.

MLflow: a parent run for the sweep; every trial's training run is its nested child (tag
mlflow.parentRunId) holding the full config as params and the loss curves, so the UI's
compare view shows trials side by side. A trial ASHA stops is marked KILLED with the tag
`stopped_early`; the best trial's config and checkpoint are recorded on the parent.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields

from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from ..errors import OptionError
from . import tracking
from .ray_train import Training, resolve
from .resources import cluster_gpus, connect
from .settings import SweepConfig, TrainJob, validate_space
from .shards import ShardSet
from .storage import open_location
from .tracking import RUN_NAME_TAG, SWEEP_TAG

TRIAL_TAG = "ray_diffusion.trial_id"


def _tune_space(space: dict) -> dict:
    make = {"loguniform": tune.loguniform, "uniform": tune.uniform, "choice": tune.choice, "grid": tune.grid_search}
    out = {}
    for name, spec in space.items():
        if isinstance(spec, dict):
            kind, args = next(iter(spec.items()))
            out[name] = make[kind](*args) if kind in ("loguniform", "uniform") else make[kind](args)
        else:
            out[name] = spec
    return out


def expected_trials(space: dict, num_samples: int) -> int:
    grids = [len(spec["grid"]) for spec in space.values() if isinstance(spec, dict) and "grid" in spec]
    return num_samples * math.prod(grids)


def trial_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def _run_trial(params: dict, base: TrainJob, sweep_name: str, parent_run_id: str, tracking_uri: str) -> None:
    """One trial: the sampled params over the base job, trained with its reports forwarded to
    Tune; its MLflow run is closed by CloseTrialRuns. The run name is the trial's, so a restored trial resumes its checkpoint.
    It runs in a Ray worker, which need not share the driver's environment: the driver's MLflow
    store comes as an argument."""
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # this trial's own process

    trial_id = tune.get_context().get_trial_id()
    job = base.replace(**params, name=trial_name(sweep_name, trial_id))
    tags = {"mlflow.parentRunId": parent_run_id, SWEEP_TAG: sweep_name, TRIAL_TAG: trial_id}
    Training(job, mlflow_tags=tags).fit(callbacks=[TuneReportCallback()])


class CloseTrialRuns(Callback):
    """On the driver: sets each trial's MLflow run's final status (ASHA stops trials, even at
    max_t, before their own code can) and prints one line per finished trial. A trial cut
    off by Ctrl-C is not complete: its run stays RUNNING until --resume finishes it."""

    def __init__(self, experiment: str, sweep_name: str, max_steps: int, metric: str):
        self.experiment, self.sweep_name, self.max_steps, self.metric = experiment, sweep_name, max_steps, metric

    def _run(self, trial) -> tracking.Run | None:
        name = trial_name(self.sweep_name, trial.trial_id)
        return tracking.Run.find(self.experiment, f"tags.`{RUN_NAME_TAG}` = '{name}'")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        step = result.get("step", 0)
        early = step < self.max_steps
        run = self._run(trial)
        if run:
            if early:
                run.set_tags({"stopped_early": f"by ASHA at step {step}"})
            run.finish("KILLED" if early else "FINISHED")
        how = f"stopped early by ASHA at step {step}" if early else f"finished {step} steps"
        print(f"trial {trial.trial_id} {how}, {self.metric} {result.get(self.metric, float('nan')):.4f}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        run = self._run(trial)
        if run:
            run.finish("FAILED")
        print(f"trial {trial.trial_id} failed: see {trial.path}", flush=True)


def _parent_run(sweep: SweepConfig, base: TrainJob, space: dict) -> tracking.Run:
    """The sweep's MLflow run: the existing one on --resume, else a new one."""
    experiment = base.settings.experiment
    found = tracking.Run.find(experiment, f"tags.`{SWEEP_TAG}` = '{sweep.name}' and tags.kind = 'sweep'")
    if found:
        if not sweep.resume:
            raise OptionError(
                f"a sweep named {sweep.name!r} already exists in MLflow experiment {experiment!r}: "
                "pass --resume to continue it, or choose another --name"
            )
        found.reopen()
        return found
    params = {f.name: getattr(sweep, f.name) for f in fields(sweep) if f.name != "resume"}
    params["space"] = json.dumps(space)
    flat = base.to_dict()
    for key in ("model", "max_steps", "data", "num_workers", "batch_size", "schedule", "lr"):
        params[f"base.{key}"] = flat[key]
    return tracking.Run.create(experiment, sweep.name, {SWEEP_TAG: sweep.name, "kind": "sweep"}, params)


def run_sweep(base: TrainJob, space: dict, sweep: SweepConfig):
    """Run (or, with sweep.resume, continue) a sweep; returns (best Result, its checkpoint URI),
    or (None, None) when it was interrupted."""
    validate_space(space)
    # ASHA compares the held-out loss at every report: evaluate at each one, checkpoint at some.
    every = base.settings.log_every
    fixed = {name: value for name, value in space.items() if not isinstance(value, dict)}
    base = resolve(  # fixed values of the space must make a valid job too
        base.replace(
            **fixed,
            name=sweep.name,
            eval_every=every,
            checkpoint_every=max(every, base.settings.checkpoint_every // every * every),
            fid_every=every if sweep.metric == "fid" else base.settings.fid_every,
        )
    )
    s, max_steps = base.settings, base.recipe.max_steps
    storage = open_location(s.storage, s.endpoint_url)
    experiment_path = f"{storage.path}/{sweep.name}"
    restorable = tune.Tuner.can_restore(experiment_path, storage_filesystem=storage.fs)
    if sweep.resume and not restorable:
        raise OptionError(f"--resume: no sweep named {sweep.name!r} under {s.storage}; drop --resume to start it")
    if restorable and not sweep.resume:
        raise OptionError(f"a sweep named {sweep.name!r} exists under {s.storage}: pass --resume or another --name")
    ShardSet.open(s.data, s.endpoint_url, verify="size")  # a bad data URI fails here, not per trial
    connect(verbose=base.settings.verbose)
    # CPU-only: concurrent trials starve each other's Ray Data reads of CPUs (a hang).
    max_concurrent = sweep.max_concurrent or (0 if cluster_gpus() else 1)
    parent = _parent_run(sweep, base, space)

    trainable = tune.with_parameters(
        _run_trial, base=base, sweep_name=sweep.name, parent_run_id=parent.id, tracking_uri=parent.uri
    )
    # The trial itself only waits on its TorchTrainer, whose workers hold the real resources.
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    grace = sweep.grace_steps or max(1, max_steps // 8)
    scheduler = ASHAScheduler(
        time_attr="step", max_t=max_steps, grace_period=grace, reduction_factor=sweep.reduction_factor
    )
    callbacks = [CloseTrialRuns(s.experiment, sweep.name, max_steps, sweep.metric)]
    if sweep.resume:
        tuner = tune.Tuner.restore(
            experiment_path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=storage.fs
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=_tune_space(space),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode="min",
                num_samples=sweep.num_samples,
                scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=sweep.search_seed, max_concurrent=max_concurrent),
            ),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=storage.path, storage_filesystem=storage.fs, callbacks=callbacks
            ),
        )
    results = tuner.fit()
    # Tune returns normally on Ctrl-C too; the trials CloseTrialRuns closed are the finished ones.
    trials = tracking.runs_of(s.experiment, f"tags.`mlflow.parentRunId` = '{parent.id}'")
    done = sum(t.status in ("FINISHED", "KILLED", "FAILED") for t in trials)
    if done < expected_trials(space, sweep.num_samples):
        parent.finish("KILLED")
        print(f"sweep {sweep.name} interrupted after {done} trial(s): continue it with --resume", flush=True)
        return None, None
    best = results.get_best_result(sweep.metric, "min", scope="last")
    best_name = trial_name(sweep.name, best.metrics["trial_id"])
    best_run = tracking.Run.find(
        s.experiment, f"tags.`{SWEEP_TAG}` = '{sweep.name}' and tags.`{RUN_NAME_TAG}` = '{best_name}'"
    )
    checkpoint_uri = best_run.tags.get(tracking.CHECKPOINT_TAG, "") if best_run else ""
    parent.set_tags(
        {
            "best_trial": best_name,
            "best_config": json.dumps({k: best.config[k] for k in space}),
            "best_checkpoint_uri": checkpoint_uri,
            **({"best_run_id": best_run.id} if best_run else {}),
        }
    )
    parent.log_metrics({f"best_{sweep.metric}": best.metrics[sweep.metric]})
    parent.finish()
    return best, checkpoint_uri
