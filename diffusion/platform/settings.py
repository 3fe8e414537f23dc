"""The platform's options, each defined once with its help and range (`diffusion.config.option`),
from which the command lines derive their flags. A setting that several commands take is a field
of one small dataclass that their options inherit:

    Endpoint           the S3 endpoint (every command that reads or writes storage)
    Tracking           the MLflow experiment (every command that writes to MLflow)
    FidWeights         the FID Inception weights (training's FID, evaluation)
    CheckpointOptions  which weights to load: checkpoint, which, weights, endpoint (every command
                       that loads a checkpoint)
    RunSettings        how and where a recipe is trained: data, storage, workers, cadence, tracking,
                       precision and compile (the core's `Speed`; the core's `Recipe` is what is trained)
    TrainJob           a Recipe and its RunSettings; PRESETS; `job_from` resolves preset < file < flags
    SweepConfig        a Ray Tune sweep over recipes; its search space (SEARCHABLE, `validate_space`)
    ServeArgs          the Serve application's options

Only the standard library and `diffusion.config` are imported here, so that every --help answers
before torch, Ray or MLflow is imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, fields

from ..config import RECIPE_FIELDS, RECIPES, WHICH, Options, Recipe, Speed, option
from ..errors import OptionError

AUTO_ON_OFF = ("auto", "on", "off")
# The recipe's options a sweep can search, each with the distribution its flag draws from
# (tune/sweep.py --search-lr LOW HIGH, --search-schedule linear cosine, ...).
SEARCHABLE = {
    "lr": "loguniform",
    "schedule": "choice",
    "beta_end": "choice",
    "batch_size": "choice",
    "ema_decay": "choice",
    "warmup_steps": "choice",
    "dropout": "choice",
    "grad_clip": "choice",
}
DEFAULT_SPACE = {"lr": {"loguniform": [1e-5, 1e-3]}, "schedule": {"choice": ["linear", "cosine"]}}
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")  # of a sweep's search space
METRICS = ("heldout_loss", "heldout_loss_ema", "fid")  # a sweep ranks trials by one
EXPERIMENT = "ray-diffusion"  # the MLflow experiment every command writes to unless told otherwise
WEIGHTS = ("ema", "raw")  # of a checkpoint: the EMA weights (for sampling) or the raw ones

PLACEMENTS = {"pack": "PACK", "spread": "STRICT_SPREAD"}  # Ray placement group strategies


@dataclass(frozen=True)
class Endpoint:
    endpoint_url: str | None = option(None, "S3 endpoint (default: AWS_ENDPOINT_URL)")


@dataclass(frozen=True)
class Tracking:
    experiment: str = option(EXPERIMENT, "MLflow experiment")


@dataclass(frozen=True)
class FidWeights:
    inception_weights: str | None = option(
        None, "FID Inception weights file (default: $FID_INCEPTION_WEIGHTS or the torch hub cache)"
    )


@dataclass(frozen=True)
class CheckpointOptions(Endpoint, Options):
    """Which weights a command loads: the one definition of the checkpoint options of Serve, the
    batch jobs and every command line that reads a checkpoint."""

    _kind = "checkpoint"
    checkpoint: str = option(
        "",
        "a run folder, a checkpoint (folder or .pt), s3://..., runs:/<run id>[/<artifact path>], "
        "models:/<name>/<version or @alias>, a diffusers folder or DDPM reference weights",
        required=True,
    )
    which: str = option("latest", "of a run folder's checkpoints: the latest, or the best", choices=WHICH)
    weights: str = option("ema", "the EMA weights (for sampling), or the raw ones", choices=WEIGHTS)

    @property
    def ema(self) -> bool:
        return self.weights == "ema"

    def read(self) -> dict:
        """The checkpoint's checked payload (`diffusion.platform.checkpoint_uris.read_checkpoint`)."""
        from .checkpoint_uris import read_checkpoint  # torch: after option parsing

        return read_checkpoint(self.checkpoint, self.which, endpoint_url=self.endpoint_url)


@dataclass(frozen=True)
class RunSettings(Tracking, Speed, Endpoint, FidWeights, Options):
    """How and where a recipe is trained. A checkpoint records them as information; loading one
    never needs them."""

    _kind = "run"
    # data and storage
    data: str = option("data/cifar10", "prepared data set URI (folder or s3://bucket/prefix)")
    heldout_split: str = option("test", "split used for the held-out loss and not trained on")
    heldout_size: int = option(1000, "images in the fixed held-out (image, t, noise) set", ge=1)
    storage: str = option("runs", "where runs and checkpoints go (folder or s3://bucket/prefix)")
    name: str = option("", "run name; the same name resumes (default: derived from model and schedule)")
    init_from: str = option(
        "",
        "fine-tune: start a new run from these weights, anything --checkpoint reads (the network's shape is "
        "theirs, the rest this recipe's)",
    )
    # cadence
    log_every: int = option(100, "steps between progress lines and metrics", ge=1)
    eval_every: int = option(5000, "steps between held-out L_simple evaluations", ge=1)
    checkpoint_every: int = option(5000, "steps between checkpoints", ge=1)
    keep_checkpoints: int = option(
        3, "checkpoints kept: the K best by held-out L_simple (FID with --fid-every), and always the latest", ge=1
    )
    sample_every: int = option(20000, "steps between EMA sample grids logged to MLflow", ge=1)
    sample_n: int = option(64, "images in a sample grid", ge=1)
    sample_steps: int = option(50, "DDIM steps for sample grids and in-training FID", ge=1)
    sample_guidance: float = option(
        1.0, "guidance scale of a class-conditional model's sample grids (a row per class) and in-training FID", ge=0
    )
    fid_every: int = option(0, "steps between FIDs of fid_n EMA DDIM samples (sample_steps) in training (0: off)", ge=0)
    fid_n: int = option(5000, "samples per in-training FID, spread over the workers", ge=2)
    fid_splits: str = option("train", "reference splits of the in-training FID, e.g. train or test+train")
    # resources and speed
    num_workers: int = option(0, "Ray Train workers (0: one per GPU, or 1 without GPUs)", ge=0)
    gpus_per_worker: float = option(-1.0, "GPUs per worker (-1: 1 if the cluster has GPUs, else 0)", ge=-1)
    cpus_per_worker: float = option(
        0.0, "CPUs per worker, and its torch threads (0: 1 with GPUs, else the free CPUs but one, shared)", ge=0
    )
    placement: str = option(
        "pack",
        "where Ray puts the workers: pack (as few nodes as fit) or spread (one per node, waiting for enough nodes)",
        choices=tuple(PLACEMENTS),
    )
    channels_last: str = option(
        "auto", "channels_last memory format: auto (on GPUs: measured no faster on CPUs), on, off", choices=AUTO_ON_OFF
    )
    data_on_device: str = option(
        "auto",
        "keep each worker's training images in device memory: auto (on a GPU, when they fit), on, off",
        choices=AUTO_ON_OFF,
    )
    max_failures: int = option(3, "worker failures Ray Train recovers from", ge=0)
    register_model: str = option("", "register the final and best weights in the MLflow Model Registry under this name")
    system_metrics: bool = option(
        False, "log CPU, memory, disk, network (and GPU) metrics of rank 0's machine to MLflow"
    )
    verbose: bool = option(False, "also Ray's own log lines (its controller, Ray Data, every checkpoint and report)")

    @property
    def score(self) -> str:
        """What ranks a run's checkpoints (lower is better): FID when training measures it."""
        return "fid" if self.fid_every else "heldout_loss"


RUN_FIELDS = frozenset(f.name for f in fields(RunSettings))


@dataclass(frozen=True)
class TrainJob:
    """A training run: what is trained (`recipe`) and how (`settings`). Options are addressed by
    their flat names, which the two never share: `job.replace(lr=1e-3, storage="s3://b/runs")`."""

    recipe: Recipe = dataclasses.field(default_factory=Recipe)
    settings: RunSettings = dataclasses.field(default_factory=RunSettings)

    def replace(self, **changes) -> TrainJob:
        unknown = sorted(set(changes) - RECIPE_FIELDS - RUN_FIELDS)
        if unknown:
            raise OptionError(f"unknown training option(s) {unknown}")
        recipe = self.recipe.replace(**{k: v for k, v in changes.items() if k in RECIPE_FIELDS})
        return TrainJob(recipe, self.settings.replace(**{k: v for k, v in changes.items() if k in RUN_FIELDS}))

    def to_dict(self) -> dict:
        """Flat: every option by its name (MLflow params, a config file)."""
        return {**self.recipe.to_dict(), **self.settings.to_dict()}

    def validate(self) -> TrainJob:
        """The job, once its model is known to be a UNet config (every range is checked when options are made)."""
        self.recipe.validate()
        return self


PRESETS: dict[str, TrainJob] = {
    "cifar10": TrainJob(RECIPES["cifar10"]),
    "stl10": TrainJob(RECIPES["stl10"], RunSettings(data="data/stl10")),
    # The digits (prepare_data.py --dataset digits): the whole test split held out, the images
    # read once into the worker's memory (115 KB, not streamed per 11-step epoch).
    "digits": TrainJob(
        RECIPES["digits"],
        RunSettings(
            data="data/digits",
            data_on_device="on",
            heldout_size=360,
            eval_every=500,
            checkpoint_every=1000,
            sample_every=1000,
        ),
    ),
    # CIFAR-10 on a 2-core CPU (README: the seed's own images): the 50,000 train images read once
    # into the worker's memory (150 MB; Ray Data then takes no CPU from training), the test
    # split's first 500 held out, checkpoints every 500 steps (a run cut short resumes).
    "cifar10-cpu": TrainJob(
        RECIPES["cifar10-cpu"],
        RunSettings(
            data_on_device="on",
            heldout_size=500,
            log_every=50,
            eval_every=500,
            checkpoint_every=500,
            sample_every=1000,
            sample_n=64,
            sample_steps=50,
        ),
    ),
    # Frequent logs and checkpoints for CPU tests and demos.
    "tiny": TrainJob(
        RECIPES["tiny"],
        RunSettings(
            heldout_size=64,
            log_every=10,
            eval_every=50,
            checkpoint_every=50,
            sample_every=100,
            sample_n=16,
            sample_steps=10,
        ),
    ),
}

# The class-conditional CIFAR-10 run on a 2-core CPU: cifar10-cpu's settings, its grids a row per
# class guided at s = 3 (a run of many sittings resumes from its checkpoints every 500 steps).
PRESETS["cifar10-classes"] = TrainJob(
    RECIPES["cifar10-classes"], PRESETS["cifar10-cpu"].settings.replace(sample_n=80, sample_guidance=3.0)
)


def job_from(preset: str, file_options: dict | None = None, flags: dict | None = None) -> TrainJob:
    """A preset, overridden by a file's options, overridden by flags (not validated yet: `fit`
    validates a job once, before starting anything)."""
    if preset not in PRESETS:
        raise OptionError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    return PRESETS[preset].replace(**(file_options or {})).replace(**(flags or {}))


@dataclass
class SweepConfig(Options):
    """A Ray Tune sweep over recipes (`diffusion.platform.sweep`)."""

    _kind = "sweep"
    name: str = option("sweep", "the sweep's name: its Tune folder under --storage, MLflow parent run and trial names")
    num_samples: int = option(8, "trials drawn from the space (times every grid's size)", ge=1)
    metric: str = option(
        "heldout_loss",
        "what ASHA and the best trial minimise: held-out L_simple of the raw or EMA weights, or the FID of "
        "--fid-n EMA samples against --fid-splits (computed at every report: costly)",
        choices=METRICS,
    )
    grace_steps: int = option(0, "steps every trial runs before ASHA may stop it (0: max_steps // 8)", ge=0)
    reduction_factor: int = option(2, "ASHA keeps the best 1/reduction_factor at each rung", ge=2)
    max_concurrent: int = option(0, "trials at once (0: as many as GPUs allow, 1 on clusters without GPUs)", ge=0)
    search_seed: int = option(0, "seed of the random search over the space")
    resume: bool = option(False, "continue the interrupted sweep of this name and storage")


def validate_space(space: dict) -> dict:
    """Check a search space {param: {distribution: args} | value} and return it.

    distributions: loguniform [low, high], uniform [low, high], choice [values], grid [values]."""
    if not space:
        raise OptionError("the search space is empty: give at least one of " + ", ".join(SEARCHABLE))
    for name, spec in space.items():
        if name not in SEARCHABLE:
            raise OptionError(f"cannot search over {name!r}: choose from {', '.join(SEARCHABLE)}")
        if not isinstance(spec, dict):
            continue  # a fixed value
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise OptionError(f"{name}: give one of {', '.join(DISTRIBUTIONS)}, e.g. {{'loguniform': [1e-5, 1e-3]}}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise OptionError(f"{name}: {kind} needs a non-empty list, got {args!r}")
        if kind in ("loguniform", "uniform"):
            low_ok = len(args) == 2 and all(isinstance(v, (int, float)) for v in args) and args[0] < args[1]
            if not low_ok or (kind == "loguniform" and args[0] <= 0):
                raise OptionError(
                    f"{name}: {kind} needs [low, high] with 0 {'<' if kind == 'loguniform' else '<='} low < high, got {args}"
                )
    return space


API_KEY_ENV = "RAY_DIFFUSION_API_KEY"  # the Serve endpoint's key: from the environment, never a flag or a file


def key_sha256(key: str) -> str:
    """The hex SHA-256 of an API key ('' for none): all a replica is given of it."""
    return hashlib.sha256(key.encode()).hexdigest() if key else ""


@dataclass(frozen=True)
class ServeArgs(CheckpointOptions, Speed):
    """The Serve application's options, checked when made: `build_app`'s, a Serve config's
    `args:`, and jobs/serve.py's flags: the checkpoint options every job shares, the replicas'
    Speed, and the serving bounds."""

    _kind = "serve"
    batch_size: int = option(16, "images per model batch (the fixed batch shape)", ge=1)
    batch_wait_s: float = option(0.05, "how long a batch waits for more requests", ge=0)
    replicas: int = option(1, "model replicas (the minimum when autoscaling)", ge=1)
    max_replicas: int = option(0, "autoscale up to this many replicas (0: fixed)", ge=0)
    target_ongoing_requests: float = option(32.0, "autoscaling: requests in flight per replica", gt=0)
    gpus: float = option(-1.0, "GPUs per replica (-1: 1 if the cluster has GPUs, else 0)", ge=-1)
    replicas_per_node: int = option(0, "at most this many replicas on one node (0: no limit; 1: one per host)", ge=0)
    api_key_sha256: str = option(
        "", "SHA-256 (hex) of the key requests must send as `Authorization: Bearer KEY` (empty: none)"
    )
    long_request_calls: int = option(200, "UNet calls above which a request takes the long lane", ge=1)
    max_request_calls: int = option(1000, "UNet calls above which a request gets a 422 (a batch of DDPM-1000)", ge=1)
    max_queued_calls: int = option(4000, "UNet calls a lane may hold before a request gets a 503", ge=1)

    @property
    def speed(self) -> Speed:
        return Speed(self.precision, self.compile)
