"""Ray Serve application: sampling, interpolation and diffusion sequences over HTTP.

    POST /v1/samples        {n | seeds | seed, sampler, steps, eta, spacing, variance, format}
    POST /v1/interpolations {mode: ddim (slerp of two seeds' noise) | ddpm (two uploaded images), lambdas | count, t}
    POST /v1/sequences      {seed, sampler, steps, eta, record: [timesteps], format}
    GET  /healthz           model, image shape, T, weights
    GET  /openapi.json      the schema (FastAPI)

Concurrent /v1/samples requests are batched across callers by @serve.batch; requests with
the same sampler settings share one model batch. The model is evaluated at a fixed batch
shape, so a seed gives the same image whether or not its request was batched with others.
"""

import base64
import io
import json
import random
from collections import defaultdict
from typing import Literal

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from ..checkpoint import read_checkpoint
from ..config import PRECISIONS, SAMPLERS, SPACINGS, VARIANCES, SamplerSettings, SamplerSpeed
from ..images import from_uint8, save_grid
from ..sampling import Sampler, as_uint8_hwc

MAX_IMAGES = 64  # per request
MAX_UPLOAD_BYTES = 1 << 20  # per uploaded image (base64-decoded)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sampler: Literal[SAMPLERS] = "ddim"
    steps: int = Field(50, ge=1, description="DDIM steps, at most the model's T (DDPM runs all T)")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta: 0 deterministic, 1 DDPM-like")
    spacing: Literal[SPACINGS] = "uniform"
    variance: Literal[VARIANCES] | None = Field(
        None, description="posterior or beta (DDPM beta_t; DDIM sigma-hat with eta 1); default: the model's"
    )
    clip: bool | None = Field(None, description="clip the predicted x_0 to [-1, 1]; default: the model's")

    def key(self) -> SamplerSettings:
        return SamplerSettings(self.sampler, self.steps, self.eta, self.spacing, self.variance, self.clip)


class SamplesRequest(Settings):
    n: int | None = Field(None, ge=1, le=MAX_IMAGES, description="number of images (default: len(seeds) or 1)")
    seeds: list[int] | None = Field(None, min_length=1, max_length=MAX_IMAGES, description="one seed per image")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="first seed; image i uses seed + i")
    format: Literal["png", "npz", "json"] = "png"

    @model_validator(mode="after")
    def _seeds(self):
        if self.seeds is not None:
            if any(not 0 <= s < 2**63 for s in self.seeds):
                raise ValueError("seeds: every seed must be in [0, 2**63)")
            if self.n is not None and self.n != len(self.seeds):
                raise ValueError(f"n: {self.n} does not match the {len(self.seeds)} seeds given")
            if self.seed is not None:
                raise ValueError("seed: give either seed or seeds, not both")
        return self

    def resolved_seeds(self) -> list[int]:
        if self.seeds is not None:
            return list(self.seeds)
        first = self.seed if self.seed is not None else random.randrange(2**62)
        return [first + i for i in range(self.n or 1)]


class InterpolationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["ddim", "ddpm"] = "ddim"
    seeds: list[int] | None = Field(None, min_length=2, max_length=2, description="ddim: the two noises' seeds")
    images: list[str] | None = Field(None, min_length=2, max_length=2, description="ddpm: two base64 PNGs")
    lambdas: list[float] | None = Field(None, min_length=1, max_length=MAX_IMAGES)
    count: int = Field(9, ge=2, le=MAX_IMAGES, description="evenly spaced lambdas in [0, 1] when none are given")
    t: int = Field(250, ge=0, description="ddpm: 0-based timestep the images are noised to, below the model's T")
    steps: int = Field(50, ge=1, description="ddim: DDIM steps, at most the model's T")
    spacing: Literal[SPACINGS] = "uniform"
    seed: int = Field(0, ge=0, le=2**63 - 1, description="ddpm: noise seed")
    format: Literal["png", "npz", "json"] = "png"

    @model_validator(mode="after")
    def _inputs(self):
        if self.lambdas is not None and any(not 0.0 <= x <= 1.0 for x in self.lambdas):
            raise ValueError("lambdas: every lambda must be in [0, 1]")
        if self.mode == "ddim" and self.seeds is None:
            raise ValueError("seeds: mode ddim needs two seeds")
        if self.mode == "ddpm" and self.images is None:
            raise ValueError("images: mode ddpm needs two base64-encoded PNG images")
        return self

    def resolved_lambdas(self) -> list[float]:
        return self.lambdas if self.lambdas is not None else np.linspace(0, 1, self.count).tolist()


class SequenceRequest(Settings):
    seed: int = Field(0, ge=0, le=2**63 - 1)
    record: list[int] | None = Field(None, min_length=1, max_length=MAX_IMAGES, description="timesteps to show")
    show: Literal["x_t", "pred_x0"] = "x_t"
    format: Literal["png", "npz", "json"] = "png"


app = FastAPI(title="ray-diffusion", description=__doc__)


@app.middleware("http")
async def require_json_bodies(request, call_next):
    """FastAPI reads a body as JSON only under a JSON content type (a CSRF guard); say so, and how."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method == "POST" and media_type != "application/json":
        detail = f"the body must be JSON sent as Content-Type: application/json, got {media_type or 'none'!r}"
        return JSONResponse({"detail": f"{detail} (curl: -H 'content-type: application/json')"}, status_code=415)
    return await call_next(request)


def encode(images: np.ndarray, fmt: str, headers: dict) -> Response:
    """uint8 (N, H, W, C) as one PNG grid, an npz of the array, or JSON of base64 PNGs."""
    from PIL import Image

    if fmt == "npz":
        buf = io.BytesIO()
        np.savez_compressed(buf, images=images)
        return Response(buf.getvalue(), media_type="application/octet-stream", headers=headers)
    if fmt == "json":
        pngs = []
        for image in images:
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            pngs.append(base64.b64encode(buf.getvalue()).decode())
        return Response(json.dumps({"images": pngs, **headers}), media_type="application/json", headers=headers)
    buf = io.BytesIO()
    save_grid(from_uint8(torch.from_numpy(images).permute(0, 3, 1, 2)), buf)
    return Response(buf.getvalue(), media_type="image/png", headers=headers)


def decode_png(data: str, shape: tuple[int, int, int], field: str) -> torch.Tensor:
    from PIL import Image

    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise HTTPException(422, f"{field}: not valid base64") from None
    if len(raw) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"{field}: image larger than {MAX_UPLOAD_BYTES} bytes")
    try:
        image = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    except Exception:  # noqa: BLE001 - PIL raises many types
        raise HTTPException(422, f"{field}: not a decodable image") from None
    channels, size, _ = shape
    if image.shape != (size, size, channels):
        raise HTTPException(422, f"{field}: image is {image.shape[1]}x{image.shape[0]}, the model needs {size}x{size}")
    return from_uint8(torch.from_numpy(image).permute(2, 0, 1))


class ServeArgs(BaseModel):
    """The application's arguments: `build_app`'s, and the `args:` of a Serve config file."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(description="run folder, checkpoint, s3:// URI or runs:/<mlflow run id>")
    batch_size: int = Field(16, ge=1, description="images per model batch (the fixed batch shape)")
    batch_wait_s: float = Field(0.05, ge=0, description="how long a batch waits for more requests")
    ema: bool = Field(True, description="serve the EMA weights (else the raw ones)")
    replicas: int = Field(1, ge=1, description="replicas, or the minimum when autoscaling")
    max_replicas: int = Field(0, ge=0, description="> replicas: autoscale up to this many")
    target_ongoing_requests: float = Field(32, gt=0, description="autoscaling: requests in flight per replica")
    gpus: float = Field(0.0, ge=0, description="GPUs per replica")
    precision: Literal[PRECISIONS] = "auto"
    compile: bool = False


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
@serve.ingress(app)
class DiffusionService:
    def __init__(self, args: ServeArgs):
        payload = read_checkpoint(args.checkpoint)
        speed = SamplerSpeed(args.precision, args.compile)
        self.sampler = Sampler.from_checkpoint(payload, args.batch_size, args.ema, speed)
        self.model_name = payload["config"]["model"]
        self.weights = "ema" if args.ema else "raw"
        self._sample_batch.set_max_batch_size(args.batch_size)
        self._sample_batch.set_batch_wait_timeout_s(args.batch_wait_s)

    def check(self, settings: SamplerSettings) -> SamplerSettings:
        try:
            return self.sampler.settings(settings)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None

    @app.get("/healthz")
    def healthz(self) -> dict:
        c, h, w = self.sampler.shape
        return {
            "status": "ok",
            "model": self.model_name,
            "image_shape": [h, w, c],
            "num_timesteps": self.sampler.num_timesteps,
            "weights": self.weights,
        }

    @app.post("/v1/samples")
    async def samples(self, request: SamplesRequest) -> Response:
        seeds = request.resolved_seeds()
        images, batch_requests, batch_images = await self._sample_batch((self.check(request.key()), seeds))
        headers = {
            "x-seeds": ",".join(map(str, seeds)),
            "x-batch-requests": str(batch_requests),
            "x-batch-images": str(batch_images),
        }
        return encode(images, request.format, headers)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def _sample_batch(self, jobs: list[tuple[SamplerSettings, list[int]]]) -> list[tuple[np.ndarray, int, int]]:
        """Requests from many callers; those with equal settings are sampled as one batch."""
        groups: dict[SamplerSettings, list[int]] = defaultdict(list)
        for i, (settings, _) in enumerate(jobs):
            groups[settings].append(i)
        results: list = [None] * len(jobs)
        for settings, members in groups.items():
            seeds = [s for i in members for s in jobs[i][1]]
            images = as_uint8_hwc(self.sampler.samples(seeds, settings)).numpy()
            start = 0
            for i in members:
                n = len(jobs[i][1])
                results[i] = (images[start : start + n], len(members), len(seeds))
                start += n
        return results

    @app.post("/v1/interpolations")
    def interpolations(self, request: InterpolationRequest) -> Response:
        lambdas = request.resolved_lambdas()
        T = self.sampler.num_timesteps
        if request.mode == "ddim":
            self.check(SamplerSettings("ddim", request.steps, spacing=request.spacing))
            x = self.sampler.ddim_interpolation(
                request.seeds[0], request.seeds[1], lambdas, request.steps, request.spacing
            )
        else:
            if request.t >= T:
                raise HTTPException(422, f"t must be a 0-based timestep below the model's T = {T}, got {request.t}")
            a, b = (decode_png(img, self.sampler.shape, f"images[{i}]") for i, img in enumerate(request.images))
            x = self.sampler.ddpm_interpolation(a, b, request.t, lambdas, request.seed)
        return encode(as_uint8_hwc(x).numpy(), request.format, {"x-lambdas": ",".join(f"{v:g}" for v in lambdas)})

    @app.post("/v1/sequences")
    def sequences(self, request: SequenceRequest) -> Response:
        settings = self.check(request.key())
        try:
            record, x_t, pred_x0 = self.sampler.sequences([request.seed], settings, request.record)
        except ValueError as e:
            raise HTTPException(422, f"record: {e}") from None
        frames = x_t if request.show == "x_t" else pred_x0
        return encode(as_uint8_hwc(frames).numpy(), request.format, {"x-timesteps": ",".join(map(str, record))})


def deployment_options(args: ServeArgs) -> dict:
    """Replicas and their resources: `replicas` fixed, or autoscaled up to `max_replicas`
    (adding a replica, a GPU each with gpus=1, when replicas average more than
    `target_ongoing_requests` in flight)."""
    options = {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": args.gpus}}
    if args.max_replicas > args.replicas:
        options["autoscaling_config"] = {
            "min_replicas": args.replicas,
            "initial_replicas": args.replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = args.replicas
    return options


def build_app(args: ServeArgs):
    """The Serve application for `serve.run` and `serve run diffusion.platform.serve:build_app
    checkpoint=...` (or a Serve config's `args:`): a ServeArgs, or a dict of its fields.
    `precision` (auto: bf16 on GPUs) and `compile` (CUDA graphs) set how replicas run the UNet."""
    args = ServeArgs.model_validate(args) if isinstance(args, dict) else args
    return DiffusionService.options(**deployment_options(args)).bind(args)
