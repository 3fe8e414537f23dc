"""Ray Tune sweeps over the training of `diffusion.ray_train`, compared in MLflow.

    run_sweep(base, space, SweepConfig(...))  ->  Tuner(trial)  ->  per trial: fit(config) on Ray Train

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
from dataclasses import dataclass, fields

from ray.tune import Callback

from .ray_train import RUN_NAME_TAG
from .training import TrainConfig

SWEEP_TAG = "ray_diffusion.sweep"
SEARCHABLE = ("lr", "schedule", "beta_end", "batch_size", "ema_decay", "warmup_steps", "dropout", "grad_clip")
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")


@dataclass
class SweepConfig:
    name: str = "sweep"  # the sweep's name: its Tune folder, MLflow parent run and trial-name prefix
    num_samples: int = 8  # trials drawn from the space (times every grid's size)
    metric: str = "heldout_loss"  # what ASHA and the best trial minimise: heldout_loss(_ema) or fid
    grace_steps: int = 0  # steps every trial runs before ASHA may stop it (0: max_steps // 8)
    reduction_factor: int = 2  # ASHA keeps the best 1/reduction_factor at each rung
    max_concurrent: int = 0  # trials at once (0: as many as resources allow with GPUs, 1 without)
    seed: int = 0  # seed of the search over the space
    resume: bool = False  # continue an interrupted sweep of the same name and storage


def validate_space(space: dict) -> dict:
    """Check a search space {param: {distribution: args} | value} and return it.

    distributions: loguniform [low, high], uniform [low, high], choice [values], grid [values]."""
    if not space:
        raise ValueError("the search space is empty: give at least one of " + ", ".join(SEARCHABLE))
    for name, spec in space.items():
        if name not in SEARCHABLE:
            raise ValueError(f"cannot search over {name!r}: choose from {', '.join(SEARCHABLE)}")
        if not isinstance(spec, dict):
            continue  # a fixed value
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ValueError(f"{name}: give one of {', '.join(DISTRIBUTIONS)}, e.g. {{'loguniform': [1e-5, 1e-3]}}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ValueError(f"{name}: {kind} needs a non-empty list, got {args!r}")
        if kind in ("loguniform", "uniform"):
            low_ok = len(args) == 2 and all(isinstance(v, (int, float)) for v in args) and args[0] < args[1]
            if not low_ok or (kind == "loguniform" and args[0] <= 0):
                raise ValueError(
                    f"{name}: {kind} needs [low, high] with 0 {'<' if kind == 'loguniform' else '<='} low < high, got {args}"
                )
    return space


def _tune_space(space: dict) -> dict:
    from ray import tune

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


def _run_trial(params: dict, base: dict, sweep_name: str, parent_run_id: str) -> None:
    """One trial: the sampled params over the base config, trained by `fit` with its reports
    forwarded to Tune. The run name is the trial's, so a restored trial resumes its checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .ray_train import fit

    trial_id = tune.get_context().get_trial_id()
    config = TrainConfig(**base).replace(**params, name=trial_name(sweep_name, trial_id))
    tags = {"mlflow.parentRunId": parent_run_id, SWEEP_TAG: sweep_name, "ray_diffusion.trial_id": trial_id}
    fit(config, callbacks=[TuneReportCallback()], mlflow_tags=tags, close_run=False)  # CloseTrialRuns closes it


class CloseTrialRuns(Callback):
    """On the driver: sets each trial's MLflow run's final status (ASHA stops trials, even at
    max_t, before their own code can) and prints one line per finished trial. A trial cut
    off by Ctrl-C is not complete: its run stays RUNNING until --resume finishes it."""

    def __init__(self, uri: str, experiment_id: str, sweep_name: str, max_steps: int, metric: str):
        self.uri, self.experiment_id, self.sweep_name, self.max_steps = uri, experiment_id, sweep_name, max_steps
        self.metric = metric

    def _run_id(self, trial) -> str | None:
        from mlflow.tracking import MlflowClient

        name = trial_name(self.sweep_name, trial.trial_id)
        found = MlflowClient(self.uri).search_runs(
            [self.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{name}'", max_results=1
        )
        return found[0].info.run_id if found else None

    def on_trial_complete(self, iteration, trials, trial, **info):
        from mlflow.tracking import MlflowClient

        result = trial.last_result or {}
        step = result.get("step", 0)
        early = step < self.max_steps
        run_id = self._run_id(trial)
        if run_id:
            client = MlflowClient(self.uri)
            if early:
                client.set_tag(run_id, "stopped_early", f"by ASHA at step {step}")
            client.set_terminated(run_id, status="KILLED" if early else "FINISHED")
        how = f"stopped early by ASHA at step {step}" if early else f"finished {step} steps"
        print(f"trial {trial.trial_id} {how}, {self.metric} {result.get(self.metric, float('nan')):.4f}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        from mlflow.tracking import MlflowClient

        run_id = self._run_id(trial)
        if run_id:
            MlflowClient(self.uri).set_terminated(run_id, status="FAILED")
        print(f"trial {trial.trial_id} failed: see {trial.path}", flush=True)


def _parent_run(client, experiment_id: str, sweep: SweepConfig, base: TrainConfig, space: dict) -> str:
    """The sweep's MLflow run: the existing one on --resume, else a new one."""
    found = client.search_runs(
        [experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep.name}' and tags.kind = 'sweep'", max_results=1
    )
    if found:
        if not sweep.resume:
            raise ValueError(
                f"a sweep named {sweep.name!r} already exists in MLflow experiment {base.experiment!r}: "
                "pass --resume to continue it, or choose another --name"
            )
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {SWEEP_TAG: sweep.name, "kind": "sweep"}
    run_id = client.create_run(experiment_id, run_name=sweep.name, tags=tags).info.run_id
    for f in fields(sweep):
        if f.name != "resume":
            client.log_param(run_id, f.name, getattr(sweep, f.name))
    client.log_param(run_id, "space", json.dumps(space))
    for key in ("model", "max_steps", "data", "num_workers", "batch_size", "schedule", "lr"):
        client.log_param(run_id, f"base.{key}", getattr(base, key))
    return run_id


def run_sweep(base: TrainConfig, space: dict, sweep: SweepConfig):
    """Run (or, with sweep.resume, continue) a sweep; returns (best Result, its checkpoint URI),
    or (None, None) when it was interrupted."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from .data import ShardSet, open_location
    from .ray_train import mlflow_experiment, resolve_paths, tracking_uri

    validate_space(space)
    # ASHA compares the held-out loss at every report: evaluate at each one, checkpoint at some.
    every = base.log_every
    base = resolve_paths(
        base.replace(
            name=sweep.name,
            eval_every=every,
            checkpoint_every=max(every, base.checkpoint_every // every * every),
            fid_every=every if sweep.metric == "fid" else base.fid_every,
        )
    )
    for name, value in space.items():  # fixed values must make a valid config too
        if not isinstance(value, dict):
            base.replace(**{name: value}).validate()
    storage = open_location(base.storage, base.endpoint_url or None)
    experiment_path = f"{storage.path}/{sweep.name}"
    restorable = tune.Tuner.can_restore(experiment_path, storage_filesystem=storage.fs)
    if sweep.resume and not restorable:
        raise ValueError(f"--resume: no sweep named {sweep.name!r} under {base.storage}; drop --resume to start it")
    if restorable and not sweep.resume:
        raise ValueError(f"a sweep named {sweep.name!r} exists under {base.storage}: pass --resume or another --name")
    ShardSet.open(base.data, base.endpoint_url or None, verify="size")  # a bad data URI fails here, not per trial
    if not ray.is_initialized():
        ray.init()
    max_concurrent = sweep.max_concurrent
    if not max_concurrent and not ray.cluster_resources().get("GPU"):
        max_concurrent = 1  # CPU-only: concurrent trials starve each other's Ray Data reads of CPUs (a hang)
    uri = tracking_uri()
    client = MlflowClient(uri)
    experiment_id = mlflow_experiment(client, base.experiment, uri)
    parent = _parent_run(client, experiment_id, sweep, base, space)

    trainable = tune.with_parameters(_run_trial, base=base.to_dict(), sweep_name=sweep.name, parent_run_id=parent)
    # The trial itself only waits on its TorchTrainer, whose workers hold the real resources.
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    grace = sweep.grace_steps or max(1, base.max_steps // 8)
    scheduler = ASHAScheduler(
        time_attr="step", max_t=base.max_steps, grace_period=grace, reduction_factor=sweep.reduction_factor
    )
    callbacks = [CloseTrialRuns(uri, experiment_id, sweep.name, base.max_steps, sweep.metric)]
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
                search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent),
            ),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=storage.path, storage_filesystem=storage.fs, callbacks=callbacks
            ),
        )
    results = tuner.fit()
    # Tune returns normally on Ctrl-C too; the trials CloseTrialRuns closed are the finished ones.
    trials = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    done = sum(t.info.status in ("FINISHED", "KILLED", "FAILED") for t in trials)
    if done < expected_trials(space, sweep.num_samples):
        client.set_terminated(parent, status="KILLED")
        print(f"sweep {sweep.name} interrupted after {done} trial(s): continue it with --resume", flush=True)
        return None, None
    best = results.get_best_result(sweep.metric, "min", scope="last")
    best_name = trial_name(sweep.name, best.metrics["trial_id"])
    best_runs = client.search_runs(
        [experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep.name}' and tags.`ray_diffusion.run_name` = '{best_name}'"
    )
    checkpoint_uri = best_runs[0].data.tags.get("checkpoint_uri", "") if best_runs else ""
    best_params = {k: best.config[k] for k in space}
    client.set_tag(parent, "best_trial", best_name)
    client.set_tag(parent, "best_config", json.dumps(best_params))
    client.set_tag(parent, "best_checkpoint_uri", checkpoint_uri)
    if best_runs:
        client.set_tag(parent, "best_run_id", best_runs[0].info.run_id)
    client.log_metric(parent, f"best_{sweep.metric}", best.metrics[sweep.metric])
    client.set_terminated(parent, status="FINISHED")
    return best, checkpoint_uri
