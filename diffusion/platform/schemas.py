"""The HTTP request models of the Serve application, typed strictly (no numbers as strings, no
booleans as numbers, no NaN or infinities). The sampler's settings are not written here: their
fields, ranges and help come from `diffusion.config.SamplerSettings` (`model_of`); nor are the
classes' rules (`diffusion.classes`, applied by the replica, which knows the model's classes).
"""

from __future__ import annotations

import dataclasses
import random
import typing
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from ..config import SamplerSettings

MAX_IMAGES = 64  # per request
MAX_SEED = 2**63 - 1
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def model_of(cls, config: ConfigDict, only: tuple[str, ...] = ()) -> type[BaseModel]:
    """A pydantic model with a field per field of dataclass `cls` (or those named in `only`), as
    its metadata defines it (`diffusion.config.option`): type (choices as a Literal), default,
    bounds, help."""
    types = typing.get_type_hints(cls)
    model_fields = {}
    for f in dataclasses.fields(cls):
        if only and f.name not in only:
            continue
        choices, kind = f.metadata.get("choices"), types[f.name]
        if choices:
            kind = Literal[choices] | None if f.default is None else Literal[choices]
        bounds = {k: f.metadata[k] for k in ("ge", "gt", "le", "lt") if k in f.metadata}
        model_fields[f.name] = (kind, Field(f.default, description=f.metadata["help"], **bounds))
    return create_model(f"{cls.__name__}Model", __config__=config, **model_fields)


class Settings(model_of(SamplerSettings, STRICT)):
    @model_validator(mode="after")
    def _settings(self):
        self.key()  # the rules between settings (steps are DDIM's, sigma-hat needs eta 1): a 422 naming them
        return self

    def key(self) -> SamplerSettings:
        return SamplerSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplerSettings)})


ClassItem = int | str
CLASSES = (
    "classes of a class-conditional model, by name or index (or a range 'FIRST-LAST' of indices): "
    "each class from every seed (default: class seed mod the number of classes)"
)


class SamplesRequest(Settings):
    classes: list[ClassItem] | ClassItem | None = Field(None, description=CLASSES)
    n: int | None = Field(None, ge=1, le=MAX_IMAGES, description="number of images (default: len(seeds) or 1)")
    seeds: list[int] | None = Field(None, min_length=1, max_length=MAX_IMAGES, description="one seed per image")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="first seed; image i uses seed + i")
    format: Literal["png", "npz", "json"] = "png"

    @model_validator(mode="after")
    def _seeds(self):
        if self.seeds is not None:
            if any(not 0 <= s <= MAX_SEED for s in self.seeds):
                raise ValueError("seeds: every seed must be in [0, 2**63)")
            if self.n is not None and self.n != len(self.seeds):
                raise ValueError(f"n: {self.n} does not match the {len(self.seeds)} seeds given")
            if self.seed is not None:
                raise ValueError("seed: give either seed or seeds, not both")
        elif self.seed is not None and self.seed + (self.n or 1) - 1 > MAX_SEED:
            raise ValueError(f"seed: seed + n - 1 must stay below 2**63 (image i uses seed + i), got seed {self.seed}")
        return self

    def resolved_seeds(self) -> list[int]:
        if self.seeds is not None:
            return list(self.seeds)
        first = self.seed if self.seed is not None else random.randrange(2**62)
        return [first + i for i in range(self.n or 1)]


GUIDANCE = ("guidance_scale", "guidance_min_t", "guidance_max_t")
ONE_CLASS = "the class of a class-conditional model's images, by name or index (default: the first seed's, seed mod K)"


class InterpolationRequest(model_of(SamplerSettings, STRICT, only=("steps", "spacing", *GUIDANCE))):
    classes: ClassItem | None = Field(None, description=ONE_CLASS)
    mode: Literal["ddim", "ddpm"] = "ddim"
    seeds: list[int] | None = Field(None, min_length=2, max_length=2, description="ddim: the two noises' seeds")
    images: list[str] | None = Field(None, min_length=2, max_length=2, description="ddpm: two base64 PNGs")
    lambdas: list[float] | None = Field(None, min_length=1, max_length=MAX_IMAGES)
    count: int = Field(9, ge=2, le=MAX_IMAGES, description="evenly spaced lambdas in [0, 1] when none are given")
    t: int = Field(250, ge=0, description="ddpm: 0-based timestep the images are noised to, below the model's T")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="ddpm: noise seed")
    format: Literal["png", "npz", "json"] = "png"

    @model_validator(mode="after")
    def _inputs(self):
        if self.lambdas is not None and any(not 0.0 <= x <= 1.0 for x in self.lambdas):
            raise ValueError("lambdas: every lambda must be in [0, 1]")
        if self.seeds is not None and any(not 0 <= s <= MAX_SEED for s in self.seeds):
            raise ValueError("seeds: every seed must be in [0, 2**63)")
        if self.mode == "ddim" and self.seeds is None:
            raise ValueError("seeds: mode ddim needs two seeds")
        if self.mode == "ddpm" and self.images is None:
            raise ValueError("images: mode ddpm needs two base64-encoded PNG images")
        return self

    def resolved_lambdas(self) -> list[float]:
        return self.lambdas if self.lambdas is not None else np.linspace(0, 1, self.count).tolist()


class SequenceRequest(Settings):
    classes: ClassItem | None = Field(None, description=ONE_CLASS.replace("the first seed's", "the seed's"))
    seed: int = Field(0, ge=0, le=MAX_SEED)
    record: list[int] | None = Field(None, min_length=1, max_length=MAX_IMAGES, description="timesteps to show")
    show: Literal["x_t", "pred_x0"] = "x_t"
    format: Literal["png", "npz", "json"] = "png"
