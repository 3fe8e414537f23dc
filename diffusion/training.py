"""The training recipe in plain PyTorch: config and presets, model/optimizer/EMA, the
L_simple step (DDPM Algorithm 1), the held-out loss and EMA sample grids.

Ray Train drives these from `diffusion.ray_train`; benchmarks and notebooks call them
directly on one device.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from .ema import EMA
from .samplers import ddim_sample, make_generators, randn
from .schedule import NoiseSchedule, l_simple, make_betas
from .unet import UNet, build_unet


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # model and diffusion
    model: str = _opt("cifar10", "UNet config: cifar10, stl10 or tiny")
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
    keep_checkpoints: int = _opt(3, "checkpoints kept (the latest K)")
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
    cpus_per_worker: float = _opt(0.0, "CPUs per worker (0: 1 with GPUs, 0.5 without)")
    bf16: bool = _opt(True, "bf16 autocast (on GPU only)")
    channels_last: bool = _opt(True, "channels_last memory format")
    compile: bool = _opt(False, "torch.compile the UNet")
    data_on_device: str = _opt(
        "auto", "keep each worker's training images in device memory: auto (on a GPU, when they fit), on, off"
    )
    max_failures: int = _opt(3, "worker failures Ray Train recovers from")
    experiment: str = _opt("ray-diffusion", "MLflow experiment")

    def replace(self, **changes) -> "TrainConfig":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        problems = []
        if self.schedule not in ("linear", "cosine"):
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
            raise ValueError("; ".join(problems))
        return self


PRESETS: dict[str, TrainConfig] = {
    # The DDPM CIFAR-10 recipe (Ho et al. 2020, section 4 and appendix B).
    "cifar10": TrainConfig(),
    # STL-10 at 96x96, not in the papers: the same recipe on the stl10 UNet with batch 64,
    # as each image costs 9x the compute and activation memory of a CIFAR-10 image.
    "stl10": TrainConfig(model="stl10", data="data/stl10", batch_size=64, max_steps=500_000, heldout_split="test"),
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


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then constant (the DDPM reference)."""
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))


@dataclass
class TrainState:
    model: UNet
    ema: EMA
    optimizer: torch.optim.Optimizer
    schedule: NoiseSchedule
    step: int = 0


def build_state(config: TrainConfig, device: torch.device) -> TrainState:
    torch.manual_seed(config.seed)
    model = build_unet(config.model, dropout=config.dropout).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.Adam(model.parameters(), lr=lr_at(config, 0), **extra)
    betas = make_betas(config.schedule, config.num_timesteps, config.beta_start, config.beta_end)
    return TrainState(model, EMA(model, config.ema_decay), optimizer, NoiseSchedule(betas))


def autocast(config: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16 and device.type == "cuda")


def train_step(state: TrainState, net: nn.Module, x0: Tensor, config: TrainConfig) -> tuple[Tensor, Tensor]:
    """One step of Algorithm 1 on a batch x0 in [-1, 1]: L_simple, backward, clip, Adam, EMA.
    `net` is the module to call (DDP- or compile-wrapped `state.model`). Returns the loss and
    the pre-clip gradient norm as device tensors (no host sync)."""
    device = x0.device
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(config, state.step)
    with autocast(config, device):
        loss = l_simple(net, state.schedule, x0)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm)
    state.optimizer.step()
    state.ema.update(state.model)
    state.step += 1
    return loss.detach(), grad_norm.detach()


class HeldoutSet:
    """A fixed set of (image, t, noise), drawn once from the seed: L_simple on it is a cheap,
    deterministic measure of progress that is comparable across steps, resumes and runs."""

    def __init__(self, images: Tensor, num_timesteps: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x0 = images
        self.t = torch.randint(0, num_timesteps, (len(images),), generator=g)
        self.noise = torch.randn(images.shape, generator=g)

    @torch.no_grad()
    def loss(self, model: nn.Module, schedule: NoiseSchedule, config: TrainConfig, batch_size: int = 256) -> float:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total = 0.0
        for start in range(0, len(self.x0), batch_size):
            sl = slice(start, start + batch_size)
            x0, t, noise = (v[sl].to(device) for v in (self.x0, self.t, self.noise))
            with autocast(config, device):
                total += l_simple(model, schedule, x0, t, noise).item() * len(x0)
        model.train(was_training)
        return total / len(self.x0)


@torch.no_grad()
def ddim_samples(model: nn.Module, schedule: NoiseSchedule, config: TrainConfig, seeds) -> Tensor:
    """DDIM (eta=0, sample_steps) samples of `model` from the per-seed x_T of `seeds`, in [-1, 1]."""
    device = next(model.parameters()).device
    size, channels = model.config.image_size, model.config.in_channels
    x_T = randn((len(seeds), channels, size, size), make_generators(seeds, "cpu")).to(device)
    with autocast(config, device):
        return ddim_sample(model, schedule.betas, x_T, min(config.sample_steps, config.num_timesteps)).float()


def sample_grid(model: nn.Module, schedule: NoiseSchedule, config: TrainConfig) -> Tensor:
    """Samples from fixed seeds 0..sample_n-1: the same x_T at every step of a run."""
    return ddim_samples(model, schedule, config, list(range(config.sample_n)))
