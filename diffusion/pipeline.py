"""Sampling from a trained model by seeds: the one code path behind `jobs/generate.py`, the
Serve endpoint and the batch sampling job. Image i depends only on its seed (its class, for a
class-conditional model) and the sampler settings, never on which other seeds or classes share
its batch (per-seed generators + `fixed_batch`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor, nn

from .checkpoint import SAMPLING_DEFAULTS, betas_from, class_names, model_from, sampling_defaults
from .classes import UNCONDITIONAL, describe
from .config import SamplerSettings, Speed
from .errors import OptionError
from .guidance import classifier_free_guidance
from .images import to_uint8
from .interpolate import ddim_interpolate, ddpm_interpolate
from .samplers import (
    Model,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    fixed_batch,
    make_generators,
    randn,
    timesteps,
)
from .speed import default_device, sampling_model


class Pipeline:
    """A model ready to sample: eval mode, on its device, evaluated at one batch shape, in
    the precision and compilation of `speed` (default: bf16 on CUDA, not compiled).

    Every sampler step is one model call (`net`) on all of its images (twice as many rows when
    guided: the conditional and the null halves); `observed(on_call)` runs a callback after each
    call made by this thread: a progress bar counts calls with it, and a server stops a cancelled
    request by raising from it.

    A class-conditional model (`classes`: its class names) samples each image's class, given by
    index, with classifier-free guidance as the settings say; images without one (`labels`
    None) are the null class's, the unconditional model's."""

    def __init__(
        self,
        model: nn.Module,
        betas: Tensor,
        batch_size: int = 16,
        speed: Speed = Speed(),
        defaults: dict = SAMPLING_DEFAULTS,
        classes: Sequence[str] | None = None,
    ):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.betas = betas
        self.defaults = defaults  # the checkpoint's DDPM variance and clipping
        self.batch_size = batch_size
        self.batched = fixed_batch(sampling_model(model, speed), batch_size)
        self.observers = threading.local()  # callbacks per thread: two server lanes share a Pipeline
        self.shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
        self.num_classes = model.config.num_classes
        self.classes = list(classes) if classes is not None else [str(i) for i in range(self.num_classes)]
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for a model of {self.num_classes} classes")

    @classmethod
    def from_checkpoint(
        cls,
        payload: dict,
        batch_size: int = 16,
        ema: bool = True,
        speed: Speed = Speed(),
        device: torch.device | str | None = None,
    ) -> Pipeline:
        """A Pipeline of a checkpoint payload's EMA (or raw) weights on `device` (default: this
        process's GPU, else the CPU), with the schedule it was trained with."""
        model = model_from(payload, ema).to(device or default_device())
        return cls(model, betas_from(payload), batch_size, speed, sampling_defaults(payload), class_names(payload))

    def settings(self, settings: SamplerSettings) -> SamplerSettings:
        """`settings` resolved against this checkpoint (`resolve_settings`)."""
        return resolve_settings(settings, self.defaults, self.num_timesteps, self.num_classes)

    def labels(self, classes: Sequence[int] | None, n: int) -> Tensor | None:
        """The labels of `n` images asked for `classes` (indices, one per image; None: none asked,
        the null class), on the model's device; None for an unconditional model, which refuses
        classes with an OptionError, as a conditional one refuses an index it does not know."""
        if not self.num_classes:
            if classes is not None:
                raise OptionError(UNCONDITIONAL)
            return None
        if classes is None:
            return torch.full((n,), self.num_classes, dtype=torch.long, device=self.device)
        if len(classes) != n:
            raise ValueError(f"{len(classes)} classes for {n} images: give one class per image")
        unknown = sorted({c for c in classes if not 0 <= c < self.num_classes})
        if unknown:
            raise OptionError(f"no class {unknown}: {describe(self.classes)}")
        return torch.tensor(list(classes), dtype=torch.long, device=self.device)

    def net(self, x: Tensor, t: Tensor, *labels: Tensor) -> Tensor:
        """The model's eps prediction for a sampler step (given `labels` for a conditional
        model); then this thread's observers, if any."""
        eps = self.batched(x, t, *labels)
        for on_call in getattr(self.observers, "calls", ()):
            on_call()
        return eps

    def eps_model(self, classes: Sequence[int] | None, n: int, settings: SamplerSettings) -> Model:
        """The sampler's model (x_t, t) -> eps for `n` images of `classes` (`labels`), guided as
        `settings` say (`diffusion.guidance`); `net` itself for an unconditional model."""
        labels = self.labels(classes, n)
        if labels is None:
            return self.net
        guidance = (settings.guidance_scale, settings.guidance_min_t, settings.guidance_max_t)
        return classifier_free_guidance(self.net, labels, self.num_classes, *guidance)

    @contextmanager
    def observed(self, on_call: Callable[[], None]) -> Iterator[None]:
        """Within the block, `on_call()` runs after every model call this thread makes (blocks
        nest: each observer is called); an exception it raises ends the sampling there."""
        calls = self.observers.__dict__.setdefault("calls", [])
        calls.append(on_call)
        try:
            yield
        finally:
            calls.remove(on_call)

    @torch.no_grad()
    def call_seconds(self, repeats: int = 2) -> float:
        """Seconds one model call takes at this sampler's batch shape, after a warm-up call."""
        x, t = torch.zeros((1, *self.shape), device=self.device), torch.zeros(1, dtype=torch.long, device=self.device)
        self.batched(x, t)
        synchronize = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None
        synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            self.batched(x, t)
        synchronize()
        return (time.perf_counter() - start) / repeats

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def noise(self, seeds: Sequence[int]) -> tuple[Tensor, list[torch.Generator]]:
        """x_T for each seed, and the per-seed generators that continue with its sampling noise."""
        generators = make_generators(seeds, self.device)
        return randn((len(seeds), *self.shape), generators, self.device), generators

    @torch.no_grad()
    def samples(
        self, seeds: Sequence[int], settings: SamplerSettings, record=None, classes: Sequence[int] | None = None
    ):
        """Images in [-1, 1], (N, C, H, W), of `classes` (one index per seed) for a conditional
        model; with `record`, also the recorded trajectory."""
        s = self.settings(settings)
        net = self.eps_model(classes, len(seeds), s)
        x_T, generators = self.noise(seeds)
        if s.sampler == "ddim":
            return ddim_sample(
                net,
                self.betas,
                x_T,
                steps=s.steps,
                eta=s.eta,
                spacing=s.spacing,
                variance=s.variance,
                clip_denoised=s.clip,
                generator=generators,
                record=record,
            )
        if s.sampler == "dpmpp_2m":
            return dpm_solver_sample(
                net, self.betas, x_T, steps=s.steps, spacing=s.spacing, clip_denoised=s.clip, record=record
            )
        return ddpm_sample(
            net, self.betas, x_T, variance=s.variance, clip_denoised=s.clip, generator=generators, record=record
        )

    @torch.no_grad()
    def sequences(
        self,
        seeds: Sequence[int],
        settings: SamplerSettings,
        record: Sequence[int] | None = None,
        count: int = 10,
        classes: Sequence[int] | None = None,
    ):
        """Diffusion sequences of `seeds` (of `classes`, for a conditional model), sampled as one
        batch: (timesteps from noisiest, x_t frames, predicted x_0 frames), frames seed-major,
        (len(seeds) * len(record), C, H, W); at `record` or at `count` evenly spaced timesteps
        the sampler visits."""
        if record is None:
            T = self.num_timesteps
            visited = (
                list(range(T))
                if settings.sampler == "ddpm"
                else timesteps(T, settings.steps, settings.spacing).tolist()
            )
            picks = torch.linspace(0, len(visited) - 1, min(count, len(visited))).round().long().tolist()
            record = [visited[i] for i in picks]
        record = sorted(set(record), reverse=True)
        _, trajectory = self.samples(seeds, settings, record=record, classes=classes)

        def frames(name: str) -> Tensor:
            return torch.stack([getattr(trajectory[t], name) for t in record], dim=1).flatten(0, 1)

        return record, frames("x_t"), frames("pred_x0")

    @torch.no_grad()
    def ddim_interpolation(
        self, seed_a: int, seed_b: int, lambdas: Sequence[float], settings: SamplerSettings, label: int | None = None
    ) -> Tensor:
        """DDIM's interpolation (its steps and spacing, and guidance, from `settings`) between the
        x_T of two seeds, every image of class `label` for a conditional model."""
        s = self.settings(replace(settings, sampler="ddim", eta=0.0))
        net = self.eps_model(None if label is None else [label] * len(lambdas), len(lambdas), s)
        x_T, _ = self.noise([seed_a, seed_b])
        return ddim_interpolate(net, self.betas, x_T[:1], x_T[1:], lambdas, s.steps, s.spacing)

    @torch.no_grad()
    def ddpm_interpolation(
        self,
        x0_a: Tensor,
        x0_b: Tensor,
        t: int,
        lambdas: Sequence[float],
        seed: int,
        label: int | None = None,
        settings: SamplerSettings | None = None,
    ) -> Tensor:
        """DDPM's interpolation between two images noised to t, every image of class `label` for a
        conditional model, guided as `settings` (DDPM's) say."""
        s = self.settings(settings or SamplerSettings("ddpm"))
        net = self.eps_model(None if label is None else [label] * len(lambdas), len(lambdas), s)
        return ddpm_interpolate(net, self.betas, x0_a.to(self.device), x0_b.to(self.device), t, lambdas, seed=seed)


def resolve_settings(
    settings: SamplerSettings, defaults: dict, num_timesteps: int, num_classes: int
) -> SamplerSettings:
    """`settings` resolved against a checkpoint's sampling defaults and checked against its T, and
    its guidance against a model without classes: an OptionError names what does not fit."""
    if settings.guided and not num_classes:
        raise OptionError(
            f"guidance_scale {settings.guidance_scale:g} needs a class-conditional model, and this checkpoint is "
            "unconditional (trained without classes): leave the guidance scale at 1"
        )
    return settings.resolve(defaults).validate(num_timesteps)


def steps_of(settings: SamplerSettings, num_timesteps: int) -> int:
    """Model calls of one batch sampled with `settings`: all T for DDPM, the length of tau for DDIM
    and DPM-Solver++."""
    if settings.sampler == "ddpm":
        return num_timesteps
    return len(timesteps(num_timesteps, settings.steps, settings.spacing))


def as_uint8_hwc(x: Tensor) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C) on the CPU."""
    return to_uint8(x).permute(0, 2, 3, 1).contiguous().cpu()
