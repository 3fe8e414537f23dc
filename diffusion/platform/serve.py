"""Ray Serve application: sampling, interpolation and diffusion sequences over HTTP.

    POST /v1/samples        {n | seeds | seed, sampler, steps, eta, spacing, variance, clip, format}
    POST /v1/interpolations {mode: ddim (slerp of two seeds' noise) | ddpm (two uploaded images), lambdas | count, t}
    POST /v1/sequences      {seed, sampler, steps, eta, record: [timesteps], format}
    GET  /healthz           model, image shape, T, weights, work queued
    GET  /openapi.json      the schema (FastAPI)

Concurrent /v1/samples requests are batched across callers by @serve.batch; requests with
the same sampler settings share one model batch. The model is evaluated at a fixed batch
shape, so a seed gives the same image whether or not its request was batched with others.

Work and its bounds. A request costs the UNet calls it needs at the replica's batch shape:
ceil(images / batch_size) x the sampler's steps (DDPM takes all T), which is what its time on
the replica is proportional to. Sampling never runs on the replica's event loop: it runs in one
of two lanes, each a thread of its own, so /healthz and parsing always answer. A request of at
most `long_request_calls` takes the short lane, a longer one the long lane, so a cheap request
never waits behind a DDPM chain. A request above `max_request_calls` is refused with a 422 that
names its cost and the limit (the batch job, jobs/sample.py, is for bulk work); a request that
would put more than `max_queued_calls` in its lane's queue gets a 503 with Retry-After. Bodies are JSON of at most 4 MiB (413 otherwise), typed strictly (no
numbers as strings, no booleans as numbers, no NaN or infinities); errors name the field and
echo at most a short excerpt of the input.
"""

import asyncio
import base64
import io
import json
import random
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from ..checkpoint import read_checkpoint
from ..config import PRECISIONS, SAMPLERS, SPACINGS, VARIANCES, WHICH, SamplerSettings, SamplerSpeed
from ..errors import excerpt
from ..images import from_uint8, save_grid
from ..samplers import timesteps
from ..sampling import Sampler, as_uint8_hwc
from .resources import use_assigned_resources

MAX_IMAGES = 64  # per request
MAX_UPLOAD_BYTES = 1 << 20  # per uploaded image (base64-decoded)
MAX_BODY_BYTES = 4 << 20  # two base64 uploads and the rest
MAX_NESTING = 32  # JSON levels; a request needs 3
MAX_SEED = 2**63 - 1
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------- requests


class Settings(BaseModel):
    model_config = STRICT
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


class InterpolationRequest(BaseModel):
    model_config = STRICT
    mode: Literal["ddim", "ddpm"] = "ddim"
    seeds: list[int] | None = Field(None, min_length=2, max_length=2, description="ddim: the two noises' seeds")
    images: list[str] | None = Field(None, min_length=2, max_length=2, description="ddpm: two base64 PNGs")
    lambdas: list[float] | None = Field(None, min_length=1, max_length=MAX_IMAGES)
    count: int = Field(9, ge=2, le=MAX_IMAGES, description="evenly spaced lambdas in [0, 1] when none are given")
    t: int = Field(250, ge=0, description="ddpm: 0-based timestep the images are noised to, below the model's T")
    steps: int = Field(50, ge=1, description="ddim: DDIM steps, at most the model's T")
    spacing: Literal[SPACINGS] = "uniform"
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
    seed: int = Field(0, ge=0, le=MAX_SEED)
    record: list[int] | None = Field(None, min_length=1, max_length=MAX_IMAGES, description="timesteps to show")
    show: Literal["x_t", "pred_x0"] = "x_t"
    format: Literal["png", "npz", "json"] = "png"


# ---------------------------------------------------------------------------- bodies and errors


def body_problem(body: bytes) -> tuple[int, str] | None:
    """(status, message) when a JSON body is unusable before any field is looked at, else None."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return 400, f"the body is not UTF-8 text: byte {body[e.start]:#04x} at position {e.start}"

    def refuse_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    def finite(literal: str) -> float:
        value = float(literal)
        if not np.isfinite(value):
            raise ValueError(f"the number {literal[:20]} is out of range")
        return value

    try:
        value = json.loads(text, parse_constant=refuse_constant, parse_float=finite)
    except RecursionError:
        return 422, f"the body nests deeper than {MAX_NESTING} levels"
    except json.JSONDecodeError as e:
        return 422, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    except ValueError as e:  # a refused constant, a number out of range, an integer of too many digits
        return 422, f"the body is not valid JSON: {e}"
    depth, level = 0, [(value, 1)]
    while level:
        item, d = level.pop()
        depth = max(depth, d)
        if depth > MAX_NESTING:
            return 422, f"the body nests deeper than {MAX_NESTING} levels"
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        level.extend((child, d + 1) for child in children)
    return None


class BodyGuard:
    """ASGI middleware: every POST body, before FastAPI reads it, is JSON under its content type
    (415), at most `max_bytes` long (413, without reading further), UTF-8 (400), and JSON with
    finite numbers nested at most MAX_NESTING deep (422); each refusal names the problem."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        media_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if media_type != "application/json":
            detail = f"the body must be JSON sent as Content-Type: application/json, got {media_type or 'none'!r}"
            return await self.refuse(scope, send, 415, f"{detail} (curl: -H 'content-type: application/json')")
        declared = headers.get(b"content-length", b"0").decode("latin-1")
        too_large = f"the body is larger than {self.max_bytes} bytes"
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self.refuse(scope, send, 413, too_large)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self.refuse(scope, send, 413, too_large)
            more = message.get("more_body", False)
        problem = body_problem(bytes(body))
        if problem:
            return await self.refuse(scope, send, *problem)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    async def refuse(scope, send, status: int, detail: str) -> None:
        await JSONResponse({"detail": detail}, status_code=status)(scope, None, send)


app = FastAPI(title="ray-diffusion", description=__doc__)
app.add_middleware(BodyGuard)


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field, with at most a short excerpt of what was sent (always JSON)."""
    problems = []
    for error in exc.errors()[:10]:
        field = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
        got = f" (got {excerpt(error['input'])})" if "input" in error and error["type"] != "missing" else ""
        problems.append(f"{field}: {error['msg']}{got}")
    return JSONResponse({"detail": problems}, status_code=422)


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
            Image.fromarray(image.squeeze()).save(buf, format="PNG")  # (H, W) for grey
            pngs.append(base64.b64encode(buf.getvalue()).decode())
        return Response(json.dumps({"images": pngs, **headers}), media_type="application/json", headers=headers)
    buf = io.BytesIO()
    save_grid(from_uint8(torch.from_numpy(images).permute(0, 3, 1, 2)), buf)
    return Response(buf.getvalue(), media_type="image/png", headers=headers)


def decode_png(data: str, shape: tuple[int, int, int], field: str) -> torch.Tensor:
    """An uploaded PNG as a model input; its size is read from the header and checked before a
    pixel is decoded (a small file can declare a huge image)."""
    from PIL import Image

    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise HTTPException(422, f"{field}: not valid base64") from None
    if len(raw) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"{field}: image larger than {MAX_UPLOAD_BYTES} bytes")
    channels, size, _ = shape
    try:
        image = Image.open(io.BytesIO(raw), formats=["PNG"])  # reads the header only
    except Exception:  # noqa: BLE001 - PIL raises many types
        raise HTTPException(422, f"{field}: not a PNG image") from None
    if image.size != (size, size):
        raise HTTPException(422, f"{field}: image is {image.size[0]}x{image.size[1]}, the model needs {size}x{size}")
    try:
        pixels = np.asarray(image.convert("RGB" if channels == 3 else "L")).reshape(size, size, channels)
    except Exception:  # noqa: BLE001
        raise HTTPException(422, f"{field}: not a decodable PNG image") from None
    return from_uint8(torch.from_numpy(pixels).permute(2, 0, 1))


# ---------------------------------------------------------------------------- the replica


class Lanes:
    """Two single-thread lanes for the replica's model work, short and long, with the UNet calls
    each holds (queued and running); admission refuses what exceeds the bounds."""

    def __init__(self, long_request_calls: int, max_request_calls: int, max_queued_calls: int):
        self.long, self.max_request, self.max_queued = long_request_calls, max_request_calls, max_queued_calls
        self.threads = {lane: ThreadPoolExecutor(1, thread_name_prefix=f"{lane}-lane") for lane in ("short", "long")}
        self.queued = {"short": 0, "long": 0}
        self.lock = threading.Lock()

    def admit(self, cost: int) -> str:
        """The lane a request of `cost` UNet calls runs in, now counted as queued there."""
        if cost > self.max_request:
            raise HTTPException(
                422,
                f"this request needs {cost} UNet calls (batches of images x sampler steps), more than the "
                f"{self.max_request} this server takes at once: ask for fewer images or steps, or run "
                "jobs/sample.py for bulk sampling",
            )
        lane = "long" if cost > self.long else "short"
        with self.lock:
            if self.queued[lane] + cost > self.max_queued:
                raise HTTPException(
                    503,
                    f"busy: {self.queued[lane]} UNet calls are queued in the {lane} lane; retry later",
                    headers={"Retry-After": "5"},
                )
            self.queued[lane] += cost
        return lane

    def release(self, lane: str, cost: int) -> None:
        with self.lock:
            self.queued[lane] -= cost

    async def run(self, lane: str, cost: int, fn, *args):
        """fn(*args) in `lane`'s thread (admitted with `cost`, released when done)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.threads[lane], fn, *args)
        finally:
            self.release(lane, cost)


class ServeArgs(BaseModel):
    """The application's arguments: `build_app`'s, and the `args:` of a Serve config file."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(description="run folder, checkpoint, URI (s3://, runs:/, models:/), diffusers folder, ...")
    which: Literal[WHICH] = Field("latest", description="of a run folder's checkpoints: the latest, or the best")
    endpoint_url: str | None = Field(None, description="S3 endpoint (default: AWS_ENDPOINT_URL)")
    batch_size: int = Field(16, ge=1, description="images per model batch (the fixed batch shape)")
    batch_wait_s: float = Field(0.05, ge=0, description="how long a batch waits for more requests")
    ema: bool = Field(True, description="serve the EMA weights (else the raw ones)")
    replicas: int = Field(1, ge=1, description="replicas, or the minimum when autoscaling")
    max_replicas: int = Field(0, ge=0, description="> replicas: autoscale up to this many")
    target_ongoing_requests: float = Field(32, gt=0, description="autoscaling: requests in flight per replica")
    gpus: float = Field(0.0, ge=0, description="GPUs per replica")
    precision: Literal[PRECISIONS] = "auto"
    compile: bool = False
    long_request_calls: int = Field(200, ge=1, description="UNet calls above which a request takes the long lane")
    max_request_calls: int = Field(1000, ge=1, description="UNet calls one request may need (a batch of DDPM-1000)")
    max_queued_calls: int = Field(4000, ge=1, description="UNet calls a lane may hold before it answers 503")


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
@serve.ingress(app)
class DiffusionService:
    def __init__(self, args: ServeArgs):
        use_assigned_resources()
        payload = read_checkpoint(args.checkpoint, args.endpoint_url, args.which)
        speed = SamplerSpeed(args.precision, args.compile)
        self.sampler = Sampler.from_checkpoint(payload, args.batch_size, args.ema, speed)
        self.model_name = payload["config"]["model"]
        self.weights = "ema" if args.ema else "raw"
        self.lanes = Lanes(args.long_request_calls, args.max_request_calls, args.max_queued_calls)
        self.batch_size = args.batch_size
        self.batchers = {"short": self._short_batch, "long": self._long_batch}
        for batcher in self.batchers.values():
            batcher.set_max_batch_size(args.batch_size)
            batcher.set_batch_wait_timeout_s(args.batch_wait_s)

    def check(self, settings: SamplerSettings) -> SamplerSettings:
        try:
            return self.sampler.settings(settings)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None

    def calls(self, settings: SamplerSettings, images: int) -> int:
        """UNet calls for `images` images: batches at the fixed batch shape x sampler steps."""
        T = self.sampler.num_timesteps
        steps = T if settings.sampler == "ddpm" else len(timesteps(T, settings.steps, settings.spacing))
        return -(-images // self.batch_size) * steps

    @app.get("/healthz")
    def healthz(self) -> dict:
        c, h, w = self.sampler.shape
        return {
            "status": "ok",
            "model": self.model_name,
            "image_shape": [h, w, c],
            "num_timesteps": self.sampler.num_timesteps,
            "weights": self.weights,
            "queued_unet_calls": dict(self.lanes.queued),
        }

    @app.post("/v1/samples")
    async def samples(self, request: SamplesRequest) -> Response:
        settings, seeds = self.check(request.key()), request.resolved_seeds()
        cost = self.calls(settings, len(seeds))
        lane = self.lanes.admit(cost)
        try:
            images, batch_requests, batch_images = await self.batchers[lane]((settings, seeds))
        finally:
            self.lanes.release(lane, cost)
        headers = {
            "x-seeds": ",".join(map(str, seeds)),
            "x-batch-requests": str(batch_requests),
            "x-batch-images": str(batch_images),
        }
        return encode(images, request.format, headers)

    # One batcher a lane: a batch never mixes a long request with short ones, which would wait for it.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def _short_batch(self, jobs: list[tuple[SamplerSettings, list[int]]]) -> list:
        return await self._sample_batch("short", jobs)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def _long_batch(self, jobs: list[tuple[SamplerSettings, list[int]]]) -> list:
        return await self._sample_batch("long", jobs)

    async def _sample_batch(self, lane: str, jobs: list[tuple[SamplerSettings, list[int]]]) -> list:
        """Requests from many callers; those with equal settings are sampled as one batch, in the
        lane's thread."""
        groups: dict[SamplerSettings, list[int]] = defaultdict(list)
        for i, (settings, _) in enumerate(jobs):
            groups[settings].append(i)
        results: list = [None] * len(jobs)
        loop = asyncio.get_running_loop()
        for settings, members in groups.items():
            seeds = [s for i in members for s in jobs[i][1]]
            images = await loop.run_in_executor(self.lanes.threads[lane], self._images, seeds, settings)
            start = 0
            for i in members:
                n = len(jobs[i][1])
                results[i] = (images[start : start + n], len(members), len(seeds))
                start += n
        return results

    def _images(self, seeds: list[int], settings: SamplerSettings) -> np.ndarray:
        return as_uint8_hwc(self.sampler.samples(seeds, settings)).numpy()

    @app.post("/v1/interpolations")
    async def interpolations(self, request: InterpolationRequest) -> Response:
        lambdas = request.resolved_lambdas()
        T = self.sampler.num_timesteps
        if request.mode == "ddim":
            settings = self.check(SamplerSettings("ddim", request.steps, spacing=request.spacing))
            cost = self.calls(settings, len(lambdas))
            work = (self.sampler.ddim_interpolation, request.seeds[0], request.seeds[1], lambdas, request.steps)
            work += (request.spacing,)
        else:
            if request.t >= T:
                raise HTTPException(422, f"t must be a 0-based timestep below the model's T = {T}, got {request.t}")
            a, b = (decode_png(img, self.sampler.shape, f"images[{i}]") for i, img in enumerate(request.images))
            cost = -(-len(lambdas) // self.batch_size) * (request.t + 1)
            work = (self.sampler.ddpm_interpolation, a, b, request.t, lambdas, request.seed)
        lane = self.lanes.admit(cost)
        x = await self.lanes.run(lane, cost, *work)
        return encode(as_uint8_hwc(x).numpy(), request.format, {"x-lambdas": ",".join(f"{v:g}" for v in lambdas)})

    @app.post("/v1/sequences")
    async def sequences(self, request: SequenceRequest) -> Response:
        settings = self.check(request.key())
        cost = self.calls(settings, 1)
        lane = self.lanes.admit(cost)
        try:
            record, x_t, pred_x0 = await self.lanes.run(
                lane, cost, self.sampler.sequences, [request.seed], settings, request.record
            )
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


def deployment_failure(app_name: str = "default") -> str:
    """Why an application failed to deploy, as its deployments report it: the last line of their
    replicas' traceback (e.g. `CheckpointError: ...`), not the controller's whole message."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    messages = [d.message for d in app.deployments.values() if d.message] if app else []
    lines = [line.strip() for message in messages for line in message.splitlines() if line.strip()]
    causes = [line for line in lines if "Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0]]
    return causes[-1] if causes else (lines[-1] if lines else f"application {app_name!r} did not start")
