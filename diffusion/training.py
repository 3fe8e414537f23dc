"""Training in plain PyTorch: model/optimizer/EMA (`build_state`), the L_simple step (DDPM
Algorithm 1, `train_step`), the loop over a batch source (`train_loop`), the held-out loss, EMA
sample grids, and a training set held on the device. The recipe and its presets are
`diffusion.config.Recipe` and `RECIPES`; precision (bf16 autocast, channels_last) is an
argument, as it changes the arithmetic, not the recipe.

One device, no Ray (a debugger steps through it):

    state = build_state(RECIPES["digits"], torch.device("cpu"))
    data = DeviceData(images)  # uint8 (N, H, W, C); DeviceData(images, labels) for a recipe with num_classes
    train_loop(state, RECIPES["digits"], lambda: data.epoch(128), max_steps=4000)

`diffusion.platform.ray_train` runs the same loop on each Ray Train worker: DDP, Ray Data
batches, and its maintenance (logs, evaluation, checkpoints) after each step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .config import Recipe, sizes
from .ema import EMA
from .errors import OptionError
from .guidance import classifier_free_guidance
from .images import random_flip, to_model_input
from .samplers import ddim_sample, make_generators, randn
from .schedule import NoiseSchedule, l_simple, make_betas
from .speed import fast_cuda_kernels
from .unet import UNET_CONFIGS, UNet, UNetConfig, build_unet, shaped

Batch = tuple[Tensor, Tensor | None]  # uint8 images (B, H, W, C) and their int64 labels (B,) (-1: none), or None


def lr_at(recipe: Recipe, step: int) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then constant (the DDPM reference)."""
    return recipe.lr * min(1.0, (step + 1) / max(1, recipe.warmup_steps))


def recipe_unet(recipe: Recipe) -> UNetConfig:
    """The UNet a recipe trains: its preset (`model`) shaped by its options (0 or empty: the
    preset's), conditioned on its `num_classes`; ValueError where the shape is impossible."""
    return shaped(
        UNET_CONFIGS[recipe.model],
        recipe.image_size,
        recipe.in_channels,
        recipe.ch,
        sizes(recipe.ch_mult, "ch_mult", "1,2,2,2"),
        recipe.num_res_blocks,
        sizes(recipe.attn_resolutions, "attn_resolutions", "16,8", none_ok=True),
        dropout=recipe.dropout,
        num_classes=recipe.num_classes,
    )


def shaped_to_data(recipe: Recipe, height: int, width: int, channels: int) -> Recipe:
    """`recipe` with its UNet's shape written out for images of height x width x channels (its
    size and channels the data's unless given): the recipe a checkpoint records. An OptionError
    naming the fix where the data and the network cannot meet."""
    prepare = "jobs/prepare_data.py --size N (resize and center-crop to N x N)"
    if height != width:
        raise OptionError(
            f"the data's images are {width}x{height}: the UNet takes square ones; prepare them with {prepare}"
        )
    if recipe.in_channels and recipe.in_channels != channels:
        raise OptionError(
            f"in_channels {recipe.in_channels} does not match the data's {channels}: drop --in-channels (the data's is "
            "the default)"
        )
    if recipe.image_size and recipe.image_size != height:
        raise OptionError(
            f"image_size {recipe.image_size} does not match the data's {height}: drop --image-size (the data's is the "
            f"default), or prepare the data with jobs/prepare_data.py --size {recipe.image_size}"
        )
    try:
        unet = recipe_unet(recipe.replace(image_size=height, in_channels=channels))
    except ValueError as e:
        raise OptionError(
            f"the {recipe.model} UNet cannot take {height}x{width} images: {e}; prepare them at another size with "
            f"{prepare}, or give --ch-mult (one level per halving) and --attn-resolutions"
        ) from None
    return recipe.replace(**shape_fields(unet))


def shape_fields(unet: UNetConfig) -> dict:
    """A UNet's shape as a recipe's options."""
    return {
        "image_size": unet.image_size,
        "in_channels": unet.in_channels,
        "ch": unet.ch,
        "ch_mult": ",".join(map(str, unet.ch_mult)),
        "num_res_blocks": unet.num_res_blocks,
        "attn_resolutions": ",".join(map(str, unet.attn_resolutions)) or "none",
    }


@dataclass
class TrainState:
    model: UNet
    ema: EMA
    optimizer: torch.optim.Optimizer
    schedule: NoiseSchedule  # on the training device
    step: int = 0
    rank: int = 0  # this worker's rank: its own stream of training draws (`seed_step`)
    memory_format: torch.memory_format = torch.contiguous_format  # the model's, which its inputs take


def build_state(
    recipe: Recipe,
    device: torch.device,
    rank: int = 0,
    channels_last: bool = True,
    unet: UNetConfig | None = None,
    weights: dict | None = None,
) -> TrainState:
    """Model, Adam, EMA and noise schedule on `device`, initialised from `recipe.seed` (the same
    weights on every rank), or from `weights` (a fine-tune: model and EMA start as them). The UNet
    is the recipe's (`recipe_unet`), or `unet` (a checkpoint's own, `diffusion.checkpoint.unet_config_of`,
    to resume or fine-tune it)."""
    if device.type == "cuda":
        fast_cuda_kernels()
    torch.manual_seed(recipe.seed)
    model = build_unet(unet or recipe_unet(recipe), dropout=recipe.dropout)
    if weights is not None:
        load_initial_weights(model, weights)
    model = model.to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr_at(recipe, 0), **fastest_adam(device))
    betas = make_betas(recipe.schedule, recipe.num_timesteps, recipe.beta_start, recipe.beta_end)
    return TrainState(
        model,
        EMA(model, recipe.ema_decay, recipe.ema_warmup),
        optimizer,
        NoiseSchedule(betas).to(device),
        rank=rank,
        memory_format=memory_format,
    )


def load_initial_weights(model: UNet, weights: dict) -> None:
    """`weights` into `model`; a class-conditional model may start from unconditional weights, its
    class embedding left at zero (the unconditional model for every class)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [name for name in missing if not name.startswith("class_embed.")]:
        raise ValueError(f"the weights do not fit the UNet: missing {missing}, unexpected {unexpected}")


def fastest_adam(device: torch.device) -> dict:
    """Adam's one-kernel fused step where torch has it (CPU and CUDA: on the CIFAR-10 UNet's CPU
    step, 30 ms against foreach's 100), else its foreach step."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}


def autocast(bf16: bool, device: torch.device):
    """bf16 autocast on `device` with `bf16` (`diffusion.speed.use_bf16` decides), else nothing (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed torch's generators (the CPU's and every CUDA device's) from (seed, rank, step): each
    rank draws its own flips, t, noise and dropout, and a resumed run draws at each step what an
    uninterrupted run draws there, with no generator state to save."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0]))


def with_null_class(labels: Tensor, num_classes: int) -> Tensor:
    """Data set labels as a conditional model's: an image without a label (-1) is the null class."""
    return torch.where(labels < 0, num_classes, labels)


def training_labels(labels: Tensor, recipe: Recipe) -> Tensor:
    """The labels a conditional model trains on: the null class (`recipe.num_classes`) for a drawn
    `class_dropout` share of them, which trains the unconditional model of classifier-free
    guidance (Ho & Salimans 2022, Algorithm 1), and for every image without a label (-1)."""
    dropped = torch.rand(labels.shape, device=labels.device) < recipe.class_dropout
    return torch.where(dropped, recipe.num_classes, with_null_class(labels, recipe.num_classes))


def train_step(
    state: TrainState, net: nn.Module, x0: Tensor, recipe: Recipe, bf16: bool = False, labels: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One step of Algorithm 1 on a batch x0 in [-1, 1] (and, for a recipe with `num_classes`, its
    int64 `labels`, -1 where an image has none): flips, label dropout, L_simple, backward, clip,
    Adam, EMA, its draws seeded by `seed_step`. `net` is the module to call (DDP- or
    compile-wrapped `state.model`). Returns the loss and the pre-clip gradient norm as device
    tensors (no host sync: the schedule is on x0's device)."""
    device = x0.device
    seed_step(recipe.seed, state.rank, state.step)
    if recipe.flip:
        x0 = random_flip(x0)
    if recipe.num_classes:
        if labels is None:
            raise ValueError(f"the recipe conditions on {recipe.num_classes} classes: give each batch its labels")
        labels = training_labels(labels.to(device), recipe)
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(recipe, state.step)
    with autocast(bf16, device):
        loss = l_simple(net, state.schedule, x0, labels=labels if recipe.num_classes else None)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = recipe.grad_clip if recipe.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm)
    state.optimizer.step()
    state.ema.update(state.model, state.step)
    state.step += 1
    return loss.detach(), grad_norm.detach()


def train_loop(
    state: TrainState,
    recipe: Recipe,
    epochs: Callable[[], Iterable[Batch]],
    max_steps: int,
    net: nn.Module | None = None,
    bf16: bool = False,
    after_step: Callable[[Tensor, Tensor], None] | None = None,
) -> TrainState:
    """Train from `state.step` to `max_steps`: `train_step` on each batch of `epochs()` (one pass
    over the data, called again for the next: (uint8 (B, H, W, C) images, labels or None)),
    through `net` (default `state.model`; a DDP or compiled wrapper of it).
    `after_step(loss, grad_norm)` runs after every step with the step's device tensors
    (`state.step` already counts it)."""
    net = net or state.model
    while state.step < max_steps:
        start = state.step
        for images, labels in epochs():
            x0 = to_model_input(images).contiguous(memory_format=state.memory_format)
            loss, grad_norm = train_step(state, net, x0, recipe, bf16, labels)
            if after_step:
                after_step(loss, grad_norm)
            if state.step >= max_steps:
                break
        if state.step == start:
            raise ValueError("the batch source gave no full batch: give more images than the batch size")
    return state


class HeldoutSet:
    """A fixed set of (image, t, noise), drawn once from the seed: L_simple on it is a cheap,
    deterministic measure of progress that is comparable across steps, resumes and runs. A
    conditional model is measured given each image's label (`labels`; the null class where there
    is none)."""

    def __init__(self, images: Tensor, num_timesteps: int, seed: int, labels: Tensor | None = None):
        g = torch.Generator().manual_seed(seed)
        self.x0 = images
        self.t = torch.randint(0, num_timesteps, (len(images),), generator=g)
        self.noise = torch.randn(images.shape, generator=g)
        self.labels = torch.full((len(images),), -1, dtype=torch.long) if labels is None else labels.long()

    @torch.no_grad()
    def loss(self, model: nn.Module, schedule: NoiseSchedule, bf16: bool = False, batch_size: int = 256) -> float:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total = 0.0
        num_classes = model.config.num_classes
        for start in range(0, len(self.x0), batch_size):
            sl = slice(start, start + batch_size)
            x0, t, noise, labels = (v[sl].to(device) for v in (self.x0, self.t, self.noise, self.labels))
            labels = with_null_class(labels, num_classes) if num_classes else None
            with autocast(bf16, device):
                total += l_simple(model, schedule, x0, t, noise, labels=labels).item() * len(x0)
        model.train(was_training)
        return total / len(self.x0)


@torch.no_grad()
def ddim_samples(
    model: UNet,
    schedule: NoiseSchedule,
    seeds,
    steps: int,
    bf16: bool = False,
    classes: list[int] | None = None,
    guidance_scale: float = 1.0,
) -> Tensor:
    """DDIM (eta=0) samples of `model` in `steps` steps (at most T) from the per-seed x_T of
    `seeds`, in [-1, 1]: sample grids from fixed seeds show a run's progress at the same x_T. A
    conditional model draws `classes` (one per seed; default: the null class) guided by
    `guidance_scale`."""
    device = next(model.parameters()).device
    size, channels = model.config.image_size, model.config.in_channels
    x_T = randn((len(seeds), channels, size, size), make_generators(seeds, "cpu")).to(device)
    eps = model
    if model.config.num_classes:
        labels = torch.tensor(classes if classes is not None else [model.null_class] * len(seeds), device=device)
        eps = classifier_free_guidance(model, labels, model.null_class, guidance_scale)
    with autocast(bf16, device):
        return ddim_sample(eps, schedule.betas, x_T, steps=min(steps, len(schedule.betas))).float()


def fits_on_device(dataset_bytes: int, device: torch.device, fraction: float = 0.1) -> bool:
    """Whether a uint8 data set of this size is worth keeping on a CUDA device: at most
    `fraction` of its memory (CIFAR-10's 150 MB, or STL-10's 3.1 GB on an 80 GB GPU)."""
    if device.type != "cuda":
        return False
    return dataset_bytes <= fraction * torch.cuda.get_device_properties(device).total_memory


class DeviceData:
    """A training set held where training runs, as uint8 (N, H, W, C) images and, optionally,
    their int64 labels (N,). Each epoch is a fresh permutation drawn on the device (from its
    generator, seeded by the last training step), cut into full batches (images, labels or None):
    no host-to-device copy and no host sync per step."""

    def __init__(self, images: Tensor, labels: Tensor | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"DeviceData holds uint8 (N, H, W, C) images, got {images.dtype} {tuple(images.shape)}")
        if labels is not None and labels.shape != (len(images),):
            raise ValueError(f"DeviceData needs one label per image, got {tuple(labels.shape)} for {len(images)}")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def epoch(self, batch_size: int) -> Iterator[Batch]:
        if batch_size > len(self.images):
            raise ValueError(f"batch size {batch_size} exceeds the {len(self.images)} images of this worker")
        order = torch.randperm(len(self.images), device=self.images.device)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = order[start : start + batch_size]
            yield self.images[batch], None if self.labels is None else self.labels[batch]
