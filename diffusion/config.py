"""The core's plain-dataclass configs: the training recipe (`Recipe` and its presets, `RECIPES`),
the sampler's settings (`SamplerSettings`) and how the UNet is evaluated (`Speed`). Each field
carries its help and its range in its metadata (`option`), from which the platform derives
command-line flags and HTTP request models: a setting is defined here once. This module imports nothing heavy, so the
command lines parse their options (and answer --help) before torch is imported.

How and where a recipe is run (data, storage, workers, cadence, tracking) is the
platform's `diffusion.platform.settings.RunSettings`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from .errors import OptionError

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")  # dpmpp_2m: DPM-Solver++(2M), as k-diffusion and ComfyUI name it
SPACINGS = ("uniform", "quadratic")
VARIANCES = ("posterior", "beta")  # sigma^2: DDPM beta-tilde_t (eq. 7) or beta_t; DDIM sigma(eta) or sigma-hat
PRECISIONS = ("auto", "fp32", "bf16")
WHICH = ("latest", "best")  # of a run folder's checkpoints


def option(
    default,
    help: str,
    *,
    choices: tuple | None = None,
    ge=None,
    gt=None,
    le=None,
    lt=None,
    required: bool = False,
    aliases: tuple[str, ...] = (),
):
    """A dataclass field with its help and range: `choices`, or bounds ge/gt/le/lt; `required`: a
    value must be given (the default stands for none), a required flag on the command line;
    `aliases`: more flags for it on the command line (a short name users know it by)."""
    bounds = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    metadata = {"help": help, "choices": choices, "required": required, "aliases": aliases, **bounds}
    return field(default=default, metadata=metadata)


_RELATIONS = {
    "ge": (">=", float.__ge__),
    "gt": (">", float.__gt__),
    "le": ("<=", float.__le__),
    "lt": ("<", float.__lt__),
}


def range_text(f: dataclasses.Field) -> str:
    """A field's range in words: 'one of linear, cosine', 'in [0, 1]', '>= 1'."""
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(map(str, m["choices"]))
    if "ge" in m and "le" in m:
        return f"in [{m['ge']:g}, {m['le']:g}]"
    if "ge" in m and "lt" in m:
        return f"in [{m['ge']:g}, {m['lt']:g})"
    return " and ".join(f"{_RELATIONS[k][0]} {m[k]:g}" for k in _RELATIONS if k in m)


def out_of_range(obj) -> list[str]:
    """A problem line for every field of dataclass `obj` outside its declared range (None is
    always allowed where it is the default)."""
    problems = []
    for f in fields(obj):
        value, m = getattr(obj, f.name), f.metadata
        if m.get("required") and value == f.default:
            problems.append(f"{f.name} is required: {m['help']}")
            continue
        if value is None and f.default is None:
            continue
        bounds = [k for k in _RELATIONS if k in m]
        if bounds and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"{f.name} must be a number, got {value!r}")
            continue
        if m.get("choices"):
            ok = value in m["choices"]
        else:
            ok = all(_RELATIONS[k][1](float(value), float(m[k])) for k in bounds)  # NaN fails
        if not ok:
            problems.append(f"{f.name} must be {range_text(f)}, got {value!r}")
    return problems


def check(obj, *extra: str):
    """`obj`, or an OptionError naming every field out of range and every `extra` problem."""
    problems = out_of_range(obj) + [p for p in extra if p]
    if problems:
        raise OptionError("; ".join(problems))
    return obj


class Options:
    """An options dataclass checked when made (`check`), and its replace/to_dict/from_dict,
    unknown names refused by name."""

    def __post_init__(self):
        check(self)

    def replace(self, **changes):
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise OptionError(f"unknown {self._kind} option(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        """Options saved by another version: fields it lacks take their defaults; fields this
        version does not know are an error naming them."""
        return cls().replace(**values)


@dataclass(frozen=True)
class Recipe(Options):
    """What a trained model is and the maths of its training: the network, the forward process,
    L_simple's optimisation. A checkpoint stores it; where and on what a run trained it (the
    platform's run settings) is not part of it."""

    _kind = "recipe"
    # model and diffusion
    model: str = option(
        "cifar10",
        "UNet preset, the shape the options below change: cifar10, cifar10-cpu, stl10, ddpm-256, tiny, digits",
    )
    image_size: int = option(0, "image size the UNet takes (0: the data's)", ge=0)
    in_channels: int = option(0, "image channels (0: the data's)", ge=0)
    ch: int = option(0, "UNet base width, a multiple of 32 (0: the preset's)", ge=0)
    ch_mult: str = option("", "width multipliers, one a resolution, halved after each but the last: e.g. 1,2,2,2")
    num_res_blocks: int = option(0, "residual blocks a resolution (0: the preset's)", ge=0)
    attn_resolutions: str = option(
        "", "feature-map sizes with self-attention, e.g. 16 or 16,8, or none (default: the preset's levels)"
    )
    dropout: float = option(0.1, "dropout in every ResBlock", ge=0, lt=1)
    num_classes: int = option(
        0, "classes to condition on, the data set's (0: unconditional); sampled with classifier-free guidance", ge=0
    )
    class_dropout: float = option(
        0.1, "share of labels replaced by the null class in training (the unconditional model of guidance)", ge=0, le=1
    )
    schedule: str = option("linear", "beta schedule", choices=SCHEDULES)
    num_timesteps: int = option(1000, "diffusion steps T", ge=1)
    beta_start: float = option(1e-4, "linear schedule: first beta", gt=0, lt=1)
    beta_end: float = option(0.02, "linear schedule: last beta", gt=0, lt=1)
    # optimisation of L_simple (DDPM eq. 14) with Adam
    lr: float = option(2e-4, "Adam learning rate after warm-up", gt=0)
    warmup_steps: int = option(5000, "linear learning-rate warm-up steps", ge=0)
    batch_size: int = option(128, "global batch size, split evenly over the workers", ge=1)
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)", ge=0)
    ema_decay: float = option(0.9999, "EMA decay of the weights used for sampling", ge=0, lt=1)
    ema_warmup: bool = option(
        True, "warm the EMA decay up as diffusers' EMAModel: min(ema_decay, (1 + n) / (10 + n)) at update n"
    )
    flip: bool = option(True, "random horizontal flips")
    max_steps: int = option(800_000, "training steps", ge=1)
    seed: int = option(0, "seed of initialisation, held-out set and sample grids", ge=0)

    def validate(self) -> Recipe:
        """This recipe, once its model is known to be a UNet config (which needs torch: after option
        parsing, never for --help); its ranges were checked when it was made."""
        from .unet import UNET_CONFIGS

        if self.model not in UNET_CONFIGS:
            raise OptionError(f"model must be one of {', '.join(UNET_CONFIGS)}, got {self.model!r}")
        sizes(self.ch_mult, "ch_mult", "1,2,2,2")
        sizes(self.attn_resolutions, "attn_resolutions", "16,8", none_ok=True)
        return self


def sizes(text: str, name: str, example: str, none_ok: bool = False) -> tuple[int, ...] | None:
    """A comma-separated list of positive integers ("1,2,2"); None for "" (the preset's) and, with
    `none_ok`, () for "none"; an OptionError naming `name` and an `example` otherwise."""
    if not text.strip():
        return None
    if none_ok and text.strip().lower() == "none":
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise OptionError(f"{name} must be positive integers separated by commas (e.g. {example}), got {text!r}")
    return values


RECIPE_FIELDS = frozenset(f.name for f in fields(Recipe))

RECIPES: dict[str, Recipe] = {
    # The DDPM CIFAR-10 recipe (Ho et al. 2020, section 4 and appendix B).
    "cifar10": Recipe(),
    # STL-10 at 96x96, not in the papers: the same recipe on the stl10 UNet with batch 64,
    # as each image costs 9x the compute and activation memory of a CIFAR-10 image.
    "stl10": Recipe(model="stl10", batch_size=64, max_steps=500_000),
    # The 8x8 digits on 2 CPU cores in about 10 minutes, for measured sample quality
    # (bench/quality.py): no flips (digits are not mirror-symmetric), a short EMA (0.995: the
    # weights of the last ~200 steps).
    "digits": Recipe(
        model="digits", lr=2e-3, warmup_steps=200, batch_size=128, ema_decay=0.995, flip=False, max_steps=4000
    ),
    # CIFAR-10 on a 2-core CPU, sized for about 2 hours through Ray Train on a 2-core Sapphire Rapids (bf16): a
    # 6.5M UNet, a higher learning rate than the paper's 35.7M network takes, a short warm-up and
    # an EMA over the last ~1000 steps (the paper's 0.9999 averages over more steps than the run has).
    "cifar10-cpu": Recipe(
        model="cifar10-cpu", dropout=0.0, lr=5e-4, warmup_steps=500, batch_size=64, ema_decay=0.999, max_steps=5500
    ),
    # CIFAR-10's ten classes on a 2-core CPU, for classifier-free guidance: the cifar10-cpu UNet with
    # a class embedding, at the learning rate that won the recipe runs (1e-3 against 5e-4: held-out
    # EMA L_simple 0.0284 against 0.0290 at step 1,000, docs/evaluation.md), an EMA of 0.9995
    # (warmed up), trained as long as the classes need (the long run behind models/cifar10-classes).
    "cifar10-classes": Recipe(
        model="cifar10-cpu",
        dropout=0.0,
        num_classes=10,
        lr=1e-3,
        warmup_steps=500,
        batch_size=64,
        ema_decay=0.9995,
        max_steps=40_000,
    ),
    # CPU tests and demos: the tiny UNet, a short run.
    "tiny": Recipe(model="tiny", dropout=0.0, lr=1e-3, warmup_steps=10, batch_size=16, ema_decay=0.99, max_steps=200),
}


# Steps when none are given: the DDIM paper's 50; 20 for DPM-Solver++(2M), which its paper and
# diffusers' pipelines use (its second order reaches at 20 what DDIM needs 50-100 for).
DEFAULT_STEPS = {"ddim": 50, "dpmpp_2m": 20}


@dataclass(frozen=True)
class SamplerSettings:
    """Everything but the seeds that decides a sample; requests with equal settings can share a batch.

    The one definition of each sampler setting and of every rule between them: ranges and rules
    are checked when settings are made (an OptionError naming the setting), the samplers check
    their arguments by making settings, and the CLI flags and the HTTP request model are derived
    from these fields. `variance` and `clip` left None take the checkpoint's sampling defaults for
    DDPM (imported weights bring their scheduler's: DDPM's own CIFAR-10 release sampled with beta_t
    and clipping) and the DDIM paper's for DDIM (posterior, no clipping): `resolve` fills them in."""

    sampler: str = option(
        "ddim", "DDIM (steps, eta), DDPM (all T steps) or DPM-Solver++(2M) (steps; deterministic)", choices=SAMPLERS
    )
    steps: int | None = option(
        None,
        "DDIM and DPM-Solver++ steps: the length of the sub-sequence tau, at most the model's T "
        f"(default: {DEFAULT_STEPS['ddim']} for DDIM, {DEFAULT_STEPS['dpmpp_2m']} for DPM-Solver++)",
        ge=1,
    )
    eta: float = option(0.0, "DDIM eta of eq. (16): 0 deterministic, 1 DDPM-like", ge=0, le=1)
    spacing: str = option("uniform", "tau spacing of DDIM and DPM-Solver++", choices=SPACINGS)
    variance: str | None = option(
        None,
        "sigma^2: posterior (DDPM beta-tilde, DDIM sigma(eta)) or beta (DDPM beta_t, DDIM sigma-hat with eta 1); "
        "default: the checkpoint's for DDPM (posterior unless imported weights say otherwise), posterior for DDIM",
        choices=VARIANCES,
    )
    clip: bool | None = option(
        None, "clip the predicted x_0 to [-1, 1]; default: the checkpoint's for DDPM, off for DDIM and DPM-Solver++"
    )
    guidance_scale: float = option(
        1.0,
        "classifier-free guidance scale s of a class-conditional model, eps_null + s (eps_class - eps_null): "
        "1 samples the conditional model, 0 the unconditional one (the null class)",
        ge=0,
        aliases=("--guidance",),
    )
    guidance_min_t: int = option(
        0, "guidance interval: guide at 0-based timesteps t >= this only, the conditional model alone below", ge=0
    )
    guidance_max_t: int | None = option(
        None, "guidance interval: guide at t <= this only, the conditional model alone above (default: T - 1)", ge=0
    )

    def __post_init__(self):
        ddim, ddpm, solver = self.sampler == "ddim", self.sampler == "ddpm", self.sampler == "dpmpp_2m"
        sigma_hat = ddim and self.variance == "beta" and self.eta != 1
        interval = self.guidance_max_t is not None and self.guidance_min_t > self.guidance_max_t
        check(
            self,
            interval
            and f"guidance_min_t {self.guidance_min_t} is above guidance_max_t {self.guidance_max_t}: "
            "the guidance interval is [guidance_min_t, guidance_max_t]",
            ddpm
            and self.steps is not None
            and "steps is for DDIM and DPM-Solver++: DDPM always takes all T steps; for fewer steps of the "
            f"DDPM-like sampler use sampler ddim with eta 1 and steps {self.steps}",
            sigma_hat and f"variance beta with DDIM is the paper's sigma-hat, defined for eta = 1, got eta {self.eta}",
            solver
            and (self.eta != 0 or self.variance == "beta")
            and "DPM-Solver++(2M) is deterministic (it solves the probability-flow ODE): it takes no eta and no "
            "variance; for stochastic sampling in few steps use sampler ddim with eta 1",
        )
        if self.steps is None and not ddpm:
            object.__setattr__(self, "steps", DEFAULT_STEPS[self.sampler])

    def resolve(self, defaults: dict) -> SamplerSettings:
        """These settings with None filled from a checkpoint's `defaults` ({"variance", "clip"})."""
        ddpm = self.sampler == "ddpm"
        return dataclasses.replace(
            self,
            variance=self.variance or (defaults["variance"] if ddpm else "posterior"),
            clip=self.clip if self.clip is not None else (defaults["clip"] if ddpm else False),
        )

    def validate(self, num_timesteps: int) -> SamplerSettings:
        """These settings, or an OptionError when they need more steps than a model of T steps has."""
        if self.sampler != "ddpm" and self.steps > num_timesteps:
            raise OptionError(f"steps must be in [1, {num_timesteps}] (the model's T), got {self.steps}")
        for name in ("guidance_min_t", "guidance_max_t"):
            if (getattr(self, name) or 0) >= num_timesteps:
                raise OptionError(f"{name} must be a 0-based timestep below the model's T = {num_timesteps}")
        return self

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance mixes in the null class anywhere (s != 1)."""
        return self.guidance_scale != 1

    def label(self, num_timesteps: int) -> str:
        """A short name for run names and figures: ddim-50, ddim-50-eta0.5-quadratic, ddpm-1000-beta,
        dpmpp_2m-20, ddim-50-cfg3 (guided), ddim-50-cfg3-t100-600 (guided in an interval)."""
        if self.sampler == "ddpm":
            name = f"ddpm-{num_timesteps}" + (f"-{self.variance}" if self.variance not in (None, "posterior") else "")
        elif self.sampler == "dpmpp_2m":
            name = f"dpmpp_2m-{self.steps}" + ("" if self.spacing == "uniform" else f"-{self.spacing}")
        else:
            name = f"ddim-{self.steps}" + (f"-eta{self.eta:g}" if self.eta else "")
            name += "-sigmahat" if self.variance == "beta" else ""
            name += "" if self.spacing == "uniform" else f"-{self.spacing}"
        name += "-clip" if self.clip else ""
        if self.guided:
            name += f"-cfg{self.guidance_scale:g}"
            if self.guidance_min_t or self.guidance_max_t is not None:
                name += f"-t{self.guidance_min_t}-{num_timesteps - 1 if self.guidance_max_t is None else self.guidance_max_t}"
        return name


@dataclass(frozen=True)
class Speed:
    """How the UNet is evaluated, in training and in sampling alike. It changes the arithmetic,
    not the method: bf16 images differ slightly from fp32 ones, and each is reproducible per seed
    at one batch shape."""

    precision: str = option(
        "auto",
        "UNet precision (auto: bf16 on GPUs and for training on CPUs with native bf16, else fp32)",
        choices=PRECISIONS,
    )
    compile: bool = option(False, "torch.compile the UNet (for sampling on a GPU: CUDA graphs)")

    def __post_init__(self):
        check(self)
