"""The plain-dataclass configs: training (`TrainConfig` and its presets) and sampling
(`SamplerSettings`, `SamplerSpeed`). This module imports nothing heavy, so the command-line
entry points parse their options (and answer --help) before torch is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from .errors import OptionError

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddim", "ddpm")
SPACINGS = ("uniform", "quadratic")
VARIANCES = ("posterior", "beta")  # sigma^2: DDPM beta-tilde_t (eq. 7) or beta_t; DDIM sigma(eta) or sigma-hat
PRECISIONS = ("auto", "fp32", "bf16")
WHICH = ("latest", "best")  # of a run folder's checkpoints
SEARCHABLE = ("lr", "schedule", "beta_end", "batch_size", "ema_decay", "warmup_steps", "dropout", "grad_clip")
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")  # of a sweep's search space
METRICS = ("heldout_loss", "heldout_loss_ema", "fid")  # a sweep ranks trials by one


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # model and diffusion
    model: str = _opt("cifar10", "UNet config: cifar10, stl10, tiny or digits")
    dropout: float = _opt(0.1, "dropout in every ResBlock")
    schedule: str = _opt("linear", "beta schedule: linear or cosine")
    num_timesteps: int = _opt(1000, "diffusion steps T")
    beta_start: float = _opt(1e-4, "linear schedule: first beta")
    beta_end: float = _opt(0.02, "linear schedule: last beta")
    # optimisation
    lr: float = _opt(2e-4, "Adam learning rate after warm-up")
    warmup_steps: int = _opt(5000, "linear learning-rate warm-up steps")
    batch_size: int = _opt(128, "global batch size, split evenly over the workers")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0: off)")
    ema_decay: float = _opt(0.9999, "EMA decay of the weights used for sampling")
    flip: bool = _opt(True, "random horizontal flips")
    max_steps: int = _opt(800_000, "training steps")
    seed: int = _opt(0, "seed of initialisation, held-out set and sample grids")
    # data and storage
    data: str = _opt("data/cifar10", "prepared data set URI (folder or s3://bucket/prefix)")
    heldout_split: str = _opt("test", "split used for the held-out loss and not trained on")
    heldout_size: int = _opt(1000, "images in the fixed held-out (image, t, noise) set")
    storage: str = _opt("runs", "where runs and checkpoints go (folder or s3://bucket/prefix)")
    endpoint_url: str = _opt("", "S3 endpoint (default: AWS_ENDPOINT_URL)")
    name: str = _opt("", "run name; the same name resumes (default: derived from model and schedule)")
    # cadence
    log_every: int = _opt(100, "steps between progress lines and metrics")
    eval_every: int = _opt(5000, "steps between held-out L_simple evaluations")
    checkpoint_every: int = _opt(5000, "steps between checkpoints")
    keep_checkpoints: int = _opt(
        3, "checkpoints kept: the K best by held-out L_simple (FID with --fid-every), and always the latest"
    )
    sample_every: int = _opt(20000, "steps between EMA sample grids logged to MLflow")
    sample_n: int = _opt(64, "images in a sample grid")
    sample_steps: int = _opt(50, "DDIM steps for sample grids")
    fid_every: int = _opt(0, "steps between FIDs of fid_n EMA DDIM samples (sample_steps) in training (0: off)")
    fid_n: int = _opt(5000, "samples per in-training FID, spread over the workers")
    fid_splits: str = _opt("train", "reference splits of the in-training FID, e.g. train or test+train")
    inception_weights: str = _opt("", "FID Inception weights (default: $FID_INCEPTION_WEIGHTS or the torch hub cache)")
    # resources and speed
    num_workers: int = _opt(0, "Ray Train workers (0: one per GPU, or 1 without GPUs)")
    gpus_per_worker: float = _opt(-1.0, "GPUs per worker (-1: 1 if the cluster has GPUs, else 0)")
    cpus_per_worker: float = _opt(
        0.0, "CPUs per worker, and its torch threads (0: 1 with GPUs, else the free CPUs but one, shared)"
    )
    bf16: bool = _opt(True, "bf16 autocast (on GPU only)")
    channels_last: bool = _opt(True, "channels_last memory format")
    compile: bool = _opt(False, "torch.compile the UNet")
    data_on_device: str = _opt(
        "auto", "keep each worker's training images in device memory: auto (on a GPU, when they fit), on, off"
    )
    max_failures: int = _opt(3, "worker failures Ray Train recovers from")
    experiment: str = _opt("ray-diffusion", "MLflow experiment")
    register_model: str = _opt("", "register the final and best weights in the MLflow Model Registry under this name")
    system_metrics: bool = _opt(False, "log CPU, memory, disk, network (and GPU) metrics of rank 0's machine to MLflow")

    def replace(self, **changes) -> TrainConfig:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise OptionError(f"unknown training option(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config saved by another version: fields it lacks take their defaults; fields this
        version does not know are an error naming them."""
        return cls().replace(**values)

    def validate(self) -> TrainConfig:
        from .unet import UNET_CONFIGS  # torch: after option parsing, never for --help

        problems = []
        if self.model not in UNET_CONFIGS:
            problems.append(f"model must be one of {', '.join(UNET_CONFIGS)}, got {self.model!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be linear or cosine, got {self.schedule!r}")
        for name in (
            "batch_size",
            "max_steps",
            "log_every",
            "eval_every",
            "checkpoint_every",
            "sample_every",
            "keep_checkpoints",
            "sample_n",
            "sample_steps",
            "num_timesteps",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.data_on_device not in ("auto", "on", "off"):
            problems.append(f"data_on_device must be auto, on or off, got {self.data_on_device!r}")
        if self.fid_every < 0 or (self.fid_every and self.fid_n < 2):
            problems.append(f"fid_every must be >= 0 and fid_n >= 2, got {self.fid_every} and {self.fid_n}")
        if problems:
            raise OptionError("; ".join(problems))
        return self


PRESETS: dict[str, TrainConfig] = {
    # The DDPM CIFAR-10 recipe (Ho et al. 2020, section 4 and appendix B).
    "cifar10": TrainConfig(),
    # STL-10 at 96x96, not in the papers: the same recipe on the stl10 UNet with batch 64,
    # as each image costs 9x the compute and activation memory of a CIFAR-10 image.
    "stl10": TrainConfig(model="stl10", data="data/stl10", batch_size=64, max_steps=500_000, heldout_split="test"),
    # The 8x8 digits (prepare_data.py --dataset digits) on 2 CPU cores in about 10 minutes, for
    # measured sample quality (bench/quality.py): no flips (digits are not mirror-symmetric), the
    # whole test split held out, a short EMA (0.995: the weights of the last ~200 steps), the
    # images read once into the worker's memory.
    "digits": TrainConfig(
        model="digits",
        lr=2e-3,
        warmup_steps=200,
        batch_size=128,
        ema_decay=0.995,
        flip=False,
        max_steps=4000,
        data="data/digits",
        data_on_device="on",  # 115 KB: read once, not streamed per 11-step epoch
        heldout_size=360,
        log_every=100,
        eval_every=500,
        checkpoint_every=1000,
        sample_every=1000,
        sample_steps=50,
    ),
    # CPU tests and demos: the tiny UNet, a short run, frequent logs and checkpoints.
    "tiny": TrainConfig(
        model="tiny",
        dropout=0.0,
        lr=1e-3,
        warmup_steps=10,
        batch_size=16,
        ema_decay=0.99,
        max_steps=200,
        heldout_size=64,
        log_every=10,
        eval_every=50,
        checkpoint_every=50,
        sample_every=100,
        sample_n=16,
        sample_steps=10,
        data="data/cifar10",
    ),
}


@dataclass(frozen=True)
class SamplerSettings:
    """Everything but the seeds that decides a sample; requests with equal settings can share a batch.

    `variance` and `clip` left None take the checkpoint's sampling defaults for DDPM (imported
    weights bring their scheduler's: DDPM's own CIFAR-10 release sampled with beta_t and clipping)
    and the DDIM paper's for DDIM (posterior, no clipping): `resolve` fills them in."""

    sampler: str = "ddim"  # "ddim" or "ddpm"
    steps: int = 50  # DDIM steps: the length of tau (DDPM always runs all T)
    eta: float = 0.0  # DDIM eta, eq. (16)
    spacing: str = "uniform"  # DDIM tau spacing
    variance: str | None = None  # posterior: DDPM beta-tilde, DDIM sigma(eta); beta: DDPM beta_t, DDIM sigma-hat
    clip: bool | None = None  # clip the predicted x_0 to [-1, 1]

    def resolve(self, defaults: dict) -> SamplerSettings:
        """These settings with None filled from a checkpoint's `defaults` ({"variance", "clip"})."""
        ddpm = self.sampler == "ddpm"
        return dataclasses.replace(
            self,
            variance=self.variance or (defaults["variance"] if ddpm else "posterior"),
            clip=self.clip if self.clip is not None else (defaults["clip"] if ddpm else False),
        )

    def validate(self, num_timesteps: int) -> SamplerSettings:
        """Raise ValueError naming every setting out of range for a model of `num_timesteps` T."""
        problems = []
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.sampler == "ddim" and not 1 <= self.steps <= num_timesteps:
            problems.append(f"steps must be in [1, {num_timesteps}] (the model's T), got {self.steps}")
        if not self.eta >= 0:  # also refuses NaN
            problems.append(f"eta must be >= 0, got {self.eta}")
        if self.spacing not in SPACINGS:
            problems.append(f"spacing must be one of {', '.join(SPACINGS)}, got {self.spacing!r}")
        if self.variance not in (None, *VARIANCES):
            problems.append(f"variance must be one of {', '.join(VARIANCES)}, got {self.variance!r}")
        if self.sampler == "ddim" and self.variance == "beta" and self.eta != 1:
            problems.append(
                f"variance beta with DDIM is the paper's sigma-hat, defined for eta = 1, got eta {self.eta}"
            )
        if problems:
            raise OptionError("; ".join(problems))
        return self

    def label(self, num_timesteps: int) -> str:
        """A short name for run names and figures: ddim-50, ddim-50-eta0.5-quadratic, ddpm-1000-beta."""
        if self.sampler == "ddpm":
            name = f"ddpm-{num_timesteps}" + (f"-{self.variance}" if self.variance not in (None, "posterior") else "")
        else:
            name = f"ddim-{self.steps}" + (f"-eta{self.eta:g}" if self.eta else "")
            name += "-sigmahat" if self.variance == "beta" else ""
            name += "" if self.spacing == "uniform" else f"-{self.spacing}"
        return name + ("-clip" if self.clip else "")


@dataclass(frozen=True)
class SamplerSpeed:
    """How a sampler evaluates the UNet. It changes the arithmetic, not the method: bf16 images
    differ slightly from fp32 ones, and each is reproducible per seed at one batch shape."""

    precision: str = "auto"  # auto (bf16 on CUDA), fp32 or bf16
    compile: bool = False  # torch.compile; CUDA graphs on CUDA


@dataclass
class SweepConfig:
    """A Ray Tune sweep over TrainConfigs (`diffusion.platform.sweep`)."""

    name: str = _opt("sweep", "the sweep's name: its Tune folder under --storage, MLflow parent run and trial names")
    num_samples: int = _opt(8, "trials drawn from the space (times every grid's size)")
    metric: str = _opt(
        "heldout_loss",
        "what ASHA and the best trial minimise: held-out L_simple of the raw or EMA weights, or the FID of "
        "--fid-n EMA samples against --fid-splits (computed at every report: costly)",
        choices=METRICS,
    )
    grace_steps: int = _opt(0, "steps every trial runs before ASHA may stop it (0: max_steps // 8)")
    reduction_factor: int = _opt(2, "ASHA keeps the best 1/reduction_factor at each rung")
    max_concurrent: int = _opt(0, "trials at once (0: as many as GPUs allow, 1 on clusters without GPUs)")
    search_seed: int = _opt(0, "seed of the random search over the space")
    resume: bool = _opt(False, "continue the interrupted sweep of this name and storage")

    def validate(self) -> SweepConfig:
        if self.num_samples < 1 or self.reduction_factor < 2:
            raise OptionError("num_samples must be >= 1 and reduction_factor >= 2")
        if self.metric not in METRICS:
            raise OptionError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        return self


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
