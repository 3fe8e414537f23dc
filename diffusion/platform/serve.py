"""Ray Serve application: sampling, interpolation and diffusion sequences over HTTP.

    POST /v1/samples        {n | seeds | seed, sampler, steps, eta, spacing, variance, clip, format}
    POST /v1/interpolations {mode: ddim (slerp of two seeds' noise) | ddpm (two uploaded images), lambdas | count, t}
    POST /v1/sequences      {seed, sampler, steps, eta, record: [timesteps], format}
    GET  /healthz           model, image shape, T, weights, work queued, the replica's node
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
would put more than `max_queued_calls` in its lane's queue gets a 503 with Retry-After.

With `api_key_sha256` set (jobs/serve.py sets it from RAY_DIFFUSION_API_KEY), or else with
RAY_DIFFUSION_API_KEY in the replica's environment (a Serve config on KubeRay: the key from a
Secret), every request must send the key as `Authorization: Bearer KEY` (401 otherwise).

Request bodies are guarded and typed strictly before they reach the replica (`http`, `schemas`);
errors name the field and echo at most a short excerpt of the input. The options are
`diffusion.platform.settings.ServeArgs`.
"""

import asyncio
import os
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
from fastapi import FastAPI, HTTPException, Response
from pydantic import ConfigDict
from ray import serve

from ..checkpoint import recipe_of
from ..config import SamplerSettings
from ..samplers import timesteps
from ..sampling import Sampler, as_uint8_hwc
from .checkpoints import read_checkpoint
from .http import ApiKeyGuard, decode_png, encode, harden
from .resources import Workers, use_assigned_resources
from .schemas import InterpolationRequest, SamplesRequest, SequenceRequest, model_of
from .settings import API_KEY_ENV, ServeArgs, key_sha256

app = harden(FastAPI(title="ray-diffusion", description=__doc__))


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


@serve.deployment(max_ongoing_requests=64)  # replicas and resources: deployment_options
@serve.ingress(app)
class DiffusionService:
    def __init__(self, args: ServeArgs):
        use_assigned_resources()
        ApiKeyGuard.sha256 = args.api_key_sha256 or key_sha256(os.environ.get(API_KEY_ENV, ""))
        self.node = ray.util.get_node_ip_address()
        payload = read_checkpoint(args.checkpoint, args.endpoint_url, args.which)
        self.sampler = Sampler.from_checkpoint(payload, args.batch_size, args.ema, args.speed)
        self.model_name = recipe_of(payload).model
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
            "node": self.node,
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
            "x-node": self.node,  # the address of the replica's node
        }
        return encode(images, request.format, headers)

    # One batcher a lane: a batch never mixes a long request with short ones, which would wait for it.
    # Their batch size and wait are the replica's (set in __init__).
    @serve.batch
    async def _short_batch(self, jobs: list[tuple[SamplerSettings, list[int]]]) -> list:
        return await self._sample_batch("short", jobs)

    @serve.batch
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
    `target_ongoing_requests` in flight), at most `replicas_per_node` on a node; gpus -1 is 1 on
    a cluster with GPUs, else 0."""
    gpus = args.gpus if args.gpus >= 0 else Workers(gpus=args.gpus).resolve().gpus
    options = {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": gpus}}
    if args.max_replicas > args.replicas:
        options["autoscaling_config"] = {
            "min_replicas": args.replicas,
            "initial_replicas": args.replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = args.replicas
    if args.replicas_per_node:
        options["max_replicas_per_node"] = args.replicas_per_node
    return options


def build_app(args: ServeArgs | dict):
    """The Serve application for `serve.run` and `serve run diffusion.platform.serve:build_app
    checkpoint=...` (or a Serve config's `args:`): a ServeArgs, or a dict of its fields (strings
    are converted: `serve run` passes them so)."""
    args = serve_args(args) if isinstance(args, dict) else args
    return DiffusionService.options(**deployment_options(args)).bind(args)


def serve_args(values: dict) -> ServeArgs:
    """The ServeArgs of a dict of its fields, strings converted (`serve run` passes them so); an
    unknown or missing field, or one out of range, raises naming it."""
    return ServeArgs(**model_of(ServeArgs, ConfigDict(extra="forbid")).model_validate(values).model_dump())


def deployment_failure(app_name: str = "default") -> str:
    """Why an application failed to deploy, as its deployments report it: the last line of their
    replicas' traceback (e.g. `CheckpointError: ...`), not the controller's whole message."""
    app = serve.status().applications.get(app_name)
    messages = [d.message for d in app.deployments.values() if d.message] if app else []
    lines = [line.strip() for message in messages for line in message.splitlines() if line.strip()]
    causes = [line for line in lines if "Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0]]
    return causes[-1] if causes else (lines[-1] if lines else f"application {app_name!r} did not start")
