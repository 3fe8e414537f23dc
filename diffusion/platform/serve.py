"""Ray Serve application: sampling, interpolation and diffusion sequences over HTTP.

    POST /v1/samples        {n | seeds | seed, classes, sampler, steps, eta, spacing, variance, clip, guidance_scale, format}
    POST /v1/interpolations {mode: ddim (slerp of two seeds' noise) | ddpm (two uploaded images), lambdas | count, t}
    POST /v1/sequences      {seed, classes, sampler, steps, eta, record: [timesteps], format}
    GET  /healthz           model, image shape, T, classes, weights, each lane's work, UNet calls made, the replica's node
    GET  /openapi.json      the schema (FastAPI)

A class-conditional model draws the `classes` asked (names or indices, `diffusion.classes`: each
class from every seed; by default class seed mod K) with classifier-free guidance
(`guidance_scale`, and the interval `guidance_min_t`..`guidance_max_t`); a class it does not have
is a 422 naming its classes, as are classes or guidance asked of an unconditional model.

Concurrent /v1/samples requests are batched across callers by @serve.batch; requests with
the same sampler settings share one model batch. The model is evaluated at a fixed batch
shape, so a seed gives the same image whether or not its request was batched with others.
DDPM always takes all T steps: `steps` with sampler ddpm is a 422 that points to DDIM with eta 1
(`{"sampler": "ddim", "steps": N, "eta": 1}`), the DDPM-like sampler on a sub-sequence of N steps.

Progress streams. A POST sent with `Accept: text/event-stream` is answered with Server-Sent
Events: `event: progress` with data {"step": i, "steps": n} after each model call (i = 1..n),
then `event: result` with the images as base64 PNGs and the response headers' information, as
`format: json` gives them (whatever `format`), or `event: error` with {"status", "detail"} when
the work fails once the stream has begun (a request refused before it begins gets its 4xx). A
streamed /v1/samples request is sampled alone, not batched with others, so that every model call
is its own progress (its images are the same: a seed's image does not depend on its batch).

Work and its bounds. A request costs the UNet calls it needs at the replica's batch shape:
ceil(images / batch_size) x the sampler's steps (DDPM takes all T), which is what its time on
the replica is proportional to; a guided request's images count twice (the conditional and the
null halves of every guided step). Sampling never runs on the replica's event loop: it runs in one
of two lanes, each a thread of its own, so /healthz and parsing always answer. A request of at
most `long_request_calls` takes the short lane, a longer one the long lane, so a cheap request
never waits behind a DDPM chain. A request above `max_request_calls` is refused with a 422 that
names its cost and the limit (the batch job, jobs/sample.py, is for bulk work); a request that
would put more than `max_queued_calls` in its lane's queue gets a 503 with Retry-After.

Cancellation. A request whose client disconnects (Serve then cancels its handler) stops: not yet
running, its work is dropped; running, the lane's thread stops it after the model call under way
(a batch of /v1/samples requests, once every request sharing it is gone) and takes the lane's
next work. /healthz counts what will really run: `queued_unet_calls` per lane is the UNet calls
still to run of the requests waiting and running there (a running request's count falls with
each model call; a stopped one's leaves at once), `running_requests` per lane the requests whose
work runs now, and `unet_calls` the UNet calls the replica has made since it started.

With `api_key_sha256` set (jobs/serve.py sets it from RAY_DIFFUSION_API_KEY), or else with
RAY_DIFFUSION_API_KEY in the replica's environment (a Serve config on KubeRay: the key from a
Secret), every request must send the key as `Authorization: Bearer KEY` (401 otherwise).

Request bodies are guarded and typed strictly before they reach the replica (`http`, `schemas`);
errors name the field and echo at most a short excerpt of the input. The options are
`diffusion.platform.settings.ServeArgs`.
"""

import asyncio
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import ray
from fastapi import FastAPI, Header, HTTPException, Response
from fastapi.responses import StreamingResponse
from pydantic import ConfigDict
from ray import serve

from .. import classes
from ..checkpoint import recipe_of
from ..config import SamplerSettings
from ..errors import OptionError
from ..pipeline import Pipeline, as_uint8_hwc, steps_of
from .http import ApiKeyGuard, decode_png, encode, harden, images_json, sse
from .resources import Workers, use_assigned_resources
from .schemas import GUIDANCE, MAX_IMAGES, InterpolationRequest, SamplesRequest, SequenceRequest, model_of
from .settings import API_KEY_ENV, ServeArgs, key_sha256

app = harden(FastAPI(title="ray-diffusion", description=__doc__))
logger = logging.getLogger("ray.serve")

EVENT_STREAM = "text/event-stream"
Accept = Annotated[str, Header(description=f"{EVENT_STREAM}: progress events, then the result (Server-Sent Events)")]
STREAMED = {
    200: {"content": {EVENT_STREAM: {}}, "description": "the images, or with Accept: text/event-stream, events"}
}


# ---------------------------------------------------------------------------- the replica


class Stopped(Exception):
    """Work whose callers are all gone, stopped in its lane's thread after a model call."""


def rows(images: int, settings: SamplerSettings) -> int:
    """The rows a model call of `images` images takes: twice as many when guided."""
    return images * (2 if settings.guided else 1)


@dataclass(eq=False)
class Job:
    """One request's work: `images` sampled over `steps` model calls (`images` counts the rows of a
    model call: a guided request's images twice, `rows`). Admitted to a lane, it holds the UNet
    calls it still has to run (`remaining`); `cancelled` once its caller is gone."""

    images: int
    steps: int
    lane: str = ""
    remaining: int = 0
    running: bool = False
    cancelled: bool = False


Batched = tuple[SamplerSettings, list[int], list[int] | None, Job]  # a /v1/samples request: settings, seeds, classes


class Lanes:
    """Two single-thread lanes for the replica's model work, short and long. Each counts the UNet
    calls its jobs still have to run, which admission bounds, and the requests running there; work
    whose callers are all gone stops after its next model call."""

    def __init__(self, pipeline: Pipeline, long_request_calls: int, max_request_calls: int, max_queued_calls: int):
        self.pipeline = pipeline
        self.long, self.max_request, self.max_queued = long_request_calls, max_request_calls, max_queued_calls
        self.threads = {lane: ThreadPoolExecutor(1, thread_name_prefix=f"{lane}-lane") for lane in ("short", "long")}
        self.queued = {"short": 0, "long": 0}
        self.running = {"short": 0, "long": 0}
        self.unet_calls = 0
        self.lock = threading.Lock()

    def batches(self, images: int) -> int:
        """UNet calls of one model call on `images` images at the fixed batch shape."""
        return -(-images // self.pipeline.batch_size)

    def admit(self, job: Job) -> Job:
        """`job`, now in the lane it runs in, its UNet calls counted there as still to run."""
        cost = self.batches(job.images) * job.steps
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
        job.lane, job.remaining = lane, cost
        return job

    def cancel(self, job: Job) -> None:
        """`job`'s caller is gone: not running yet, its calls leave the lane now (its work is skipped
        unless other callers share it); running, its work stops after the model call under way
        unless other callers share it."""
        with self.lock:
            job.cancelled = True
            if not job.running:
                self._release(job)

    async def outcome(self, job: Job, work):
        """What awaitable `work` (`job`'s) gives; when the caller is cancelled meanwhile (Serve
        cancels a request whose client disconnected), `job` is cancelled."""
        try:
            return await work
        except asyncio.CancelledError:
            self.cancel(job)
            raise

    def submit(self, jobs: list[Job], fn: Callable, *args, on_step: Callable[[int], None] | None = None):
        """A future of fn(*args), sampling for `jobs` (of one lane) in the lane's thread; after the
        i-th model call, on_step(i) runs there. The jobs' remaining calls leave the lane as they
        run and when the work ends; raises Stopped once every job is cancelled."""
        return asyncio.wrap_future(self.threads[jobs[0].lane].submit(self._work, jobs, fn, args, on_step))

    def _work(self, jobs: list[Job], fn: Callable, args: tuple, on_step) -> object:
        lane, calls_per_step = jobs[0].lane, self.batches(sum(job.images for job in jobs))
        with self.lock:
            live = [job for job in jobs if not job.cancelled]
            for job in live:
                job.running = True
            self.running[lane] += len(live)
        step = 0

        def on_call():
            nonlocal step
            step += 1
            with self.lock:
                self.unet_calls += calls_per_step
                for job in jobs:
                    done = min(self.batches(job.images), job.remaining)
                    job.remaining -= done
                    self.queued[lane] -= done
                if all(job.cancelled for job in jobs):
                    raise Stopped
            if on_step:
                on_step(step)

        try:
            if not live:
                raise Stopped
            with self.pipeline.observed(on_call):
                return fn(*args)
        finally:
            with self.lock:
                for job in jobs:
                    job.running = False
                    self._release(job)
                self.running[lane] -= len(live)

    def _release(self, job: Job) -> None:  # under the lock
        self.queued[job.lane] -= job.remaining
        job.remaining = 0


@serve.deployment(max_ongoing_requests=64)  # replicas and resources: deployment_options
@serve.ingress(app)
class DiffusionService:
    def __init__(self, args: ServeArgs):
        use_assigned_resources()
        ApiKeyGuard.sha256 = args.api_key_sha256 or key_sha256(os.environ.get(API_KEY_ENV, ""))
        self.node = ray.util.get_node_ip_address()
        payload = args.read()
        self.pipeline = Pipeline.from_checkpoint(payload, args.batch_size, args.ema, args.speed)
        self.model_name = recipe_of(payload).model
        self.weights = args.weights
        self.lanes = Lanes(self.pipeline, args.long_request_calls, args.max_request_calls, args.max_queued_calls)
        self.batchers = {"short": self._short_batch, "long": self._long_batch}
        for batcher in self.batchers.values():
            batcher.set_max_batch_size(args.batch_size)
            batcher.set_batch_wait_timeout_s(args.batch_wait_s)

    def check(self, settings: SamplerSettings) -> SamplerSettings:
        try:
            return self.pipeline.settings(settings)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None

    def images(self, seeds: list[int], asked) -> tuple[list[int], list[int] | None]:
        """The (seeds, classes) of a request's images (`diffusion.classes.images`): a 422 names a
        class the model does not have (or classes asked of an unconditional model), or too many."""
        try:
            indices = (
                None
                if asked is None
                else classes.resolve(asked if isinstance(asked, list) else [asked], self.pipeline.classes)
            )
        except OptionError as e:
            raise HTTPException(422, f"classes: {e}") from None
        seeds, labels = classes.images(seeds, indices, self.pipeline.num_classes)
        if len(seeds) > MAX_IMAGES:
            raise HTTPException(
                422, f"classes x seeds make {len(seeds)} images, more than the {MAX_IMAGES} of a request"
            )
        return seeds, labels

    def one_class(self, asked, seed: int) -> int | None:
        """The class of a request's images that are all of one class (default: `seed`'s)."""
        if asked is None and not self.pipeline.num_classes:
            return None
        return self.images([seed], asked)[1][0]

    @app.get("/healthz")
    def healthz(self) -> dict:
        c, h, w = self.pipeline.shape
        with self.lanes.lock:
            queued, running, calls = dict(self.lanes.queued), dict(self.lanes.running), self.lanes.unet_calls
        return {
            "status": "ok",
            "model": self.model_name,
            "image_shape": [h, w, c],
            "num_timesteps": self.pipeline.num_timesteps,
            "classes": self.pipeline.classes,  # none: an unconditional model
            "weights": self.weights,
            "queued_unet_calls": queued,  # still to run, of the requests waiting and running in each lane
            "running_requests": running,
            "unet_calls": calls,  # made since the replica started
            "node": self.node,
        }

    @app.post("/v1/samples", responses=STREAMED)
    async def samples(self, request: SamplesRequest, accept: Accept = "") -> Response:
        settings = self.check(request.key())
        seeds, labels = self.images(request.resolved_seeds(), request.classes)
        job = self.lanes.admit(Job(rows(len(seeds), settings), steps_of(settings, self.pipeline.num_timesteps)))
        if EVENT_STREAM in accept:  # sampled alone: each model call is this request's progress
            return self.stream(job, self._samples, seeds, labels, settings)
        result = await self.lanes.outcome(job, self.batchers[job.lane]((settings, seeds, labels, job)))
        if isinstance(result, Exception):  # its batch's failure
            raise result
        images, headers = result
        return encode(images, request.format, headers)

    # One batcher a lane: a batch never mixes a long request with short ones, which would wait for it.
    # Their batch size and wait are the replica's (set in __init__).
    @serve.batch
    async def _short_batch(self, requests: list[Batched]) -> list:
        return await self._sample_batch(requests)

    @serve.batch
    async def _long_batch(self, requests: list[Batched]) -> list:
        return await self._sample_batch(requests)

    async def _sample_batch(self, requests: list[Batched]) -> list:
        """Requests from many callers; those with equal settings are sampled as one batch, in the
        lane's thread. Each request's result is its images and headers, or its batch's exception
        (Stopped when all its callers are gone), so that one batch's failure is not another's."""
        groups: dict[SamplerSettings, list[int]] = defaultdict(list)
        for i, (settings, *_) in enumerate(requests):
            groups[settings].append(i)
        results: list = [None] * len(requests)
        for settings, members in groups.items():
            seeds = [s for i in members for s in requests[i][1]]
            labels = None if requests[members[0]][2] is None else [c for i in members for c in requests[i][2]]
            jobs = [requests[i][3] for i in members]
            try:
                images, _ = await self.lanes.submit(jobs, self._samples, seeds, labels, settings)
            except Exception as e:  # noqa: BLE001 - Stopped, or a failure: these members' own
                for i in members:
                    results[i] = e
                continue
            start = 0
            for i in members:
                _, own_seeds, own_labels, _ = requests[i]
                n = len(own_seeds)
                headers = self.sample_headers(own_seeds, own_labels, len(members), len(seeds))
                results[i] = (images[start : start + n], headers)
                start += n
        return results

    def _samples(
        self, seeds: list[int], labels: list[int] | None, settings: SamplerSettings
    ) -> tuple[np.ndarray, dict]:
        images = as_uint8_hwc(self.pipeline.samples(seeds, settings, classes=labels)).numpy()
        return images, self.sample_headers(seeds, labels, 1, len(seeds))

    def sample_headers(
        self, seeds: list[int], labels: list[int] | None, batch_requests: int, batch_images: int
    ) -> dict:
        classes_of_images = {"x-classes": ",".join(self.pipeline.classes[c] for c in labels)} if labels else {}
        return {
            "x-seeds": ",".join(map(str, seeds)),
            **classes_of_images,  # each image's class, by name
            "x-batch-requests": str(batch_requests),
            "x-batch-images": str(batch_images),
            "x-node": self.node,  # the address of the replica's node
        }

    @app.post("/v1/interpolations", responses=STREAMED)
    async def interpolations(self, request: InterpolationRequest, accept: Accept = "") -> Response:
        lambdas = request.resolved_lambdas()
        T = self.pipeline.num_timesteps
        guidance = {name: getattr(request, name) for name in GUIDANCE}
        if request.mode == "ddim":
            settings = self.check(SamplerSettings("ddim", request.steps, spacing=request.spacing, **guidance))
            label = self.one_class(request.classes, request.seeds[0])
            job = Job(rows(len(lambdas), settings), steps_of(settings, T))
            work = (self.pipeline.ddim_interpolation, request.seeds[0], request.seeds[1], lambdas, settings, label)
        else:
            if request.t >= T:
                raise HTTPException(422, f"t must be a 0-based timestep below the model's T = {T}, got {request.t}")
            settings = self.check(SamplerSettings("ddpm", **guidance))
            label = self.one_class(request.classes, request.seed)
            a, b = (decode_png(img, self.pipeline.shape, f"images[{i}]") for i, img in enumerate(request.images))
            job = Job(rows(len(lambdas), settings), request.t + 1)
            work = (self.pipeline.ddpm_interpolation, a, b, request.t, lambdas, request.seed, label, settings)
        headers = {"x-lambdas": ",".join(f"{v:g}" for v in lambdas)}
        return await self.answer(self.lanes.admit(job), request.format, accept, self._interpolation, headers, *work)

    def _interpolation(self, headers: dict, fn: Callable, *args) -> tuple[np.ndarray, dict]:
        return as_uint8_hwc(fn(*args)).numpy(), headers

    @app.post("/v1/sequences", responses=STREAMED)
    async def sequences(self, request: SequenceRequest, accept: Accept = "") -> Response:
        settings = self.check(request.key())
        label = self.one_class(request.classes, request.seed)
        job = self.lanes.admit(Job(rows(1, settings), steps_of(settings, self.pipeline.num_timesteps)))
        work = (request.seed, label, settings, request.record, request.show)
        return await self.answer(job, request.format, accept, self._sequence, *work)

    def _sequence(
        self, seed: int, label: int | None, settings: SamplerSettings, record: list[int] | None, show: str
    ) -> tuple[np.ndarray, dict]:
        try:
            record, x_t, pred_x0 = self.pipeline.sequences(
                [seed], settings, record, classes=None if label is None else [label]
            )
        except ValueError as e:
            raise HTTPException(422, f"record: {e}") from None
        frames = x_t if show == "x_t" else pred_x0
        return as_uint8_hwc(frames).numpy(), {"x-timesteps": ",".join(map(str, record))}

    async def answer(self, job: Job, fmt: str, accept: str, fn: Callable, *args) -> Response:
        """fn(*args) -> (images, headers), run for admitted `job` in its lane: an event stream
        when the client accepts one, else the images encoded in `fmt`."""
        if EVENT_STREAM in accept:
            return self.stream(job, fn, *args)
        images, headers = await self.lanes.outcome(job, self.lanes.submit([job], fn, *args))
        return encode(images, fmt, headers)

    def stream(self, job: Job, fn: Callable, *args) -> StreamingResponse:
        """fn(*args) -> (images, headers), run for admitted `job` in its lane, as Server-Sent Events:
        progress after each model call, then the result or an error. A client that goes away
        cancels the job."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        work = self.lanes.submit([job], fn, *args, on_step=lambda i: loop.call_soon_threadsafe(steps.put_nowait, i))
        work.add_done_callback(lambda _: steps.put_nowait(None))  # after the last step's put: both in call order

        async def events():
            try:
                while (step := await steps.get()) is not None:
                    yield sse("progress", {"step": step, "steps": job.steps})
                images, headers = work.result()
                yield sse("result", images_json(images, headers))
            except HTTPException as e:
                yield sse("error", {"status": e.status_code, "detail": e.detail})
            except Exception:  # as a 500 would be; logged
                logger.exception("streamed request failed")
                yield sse("error", {"status": 500, "detail": "Internal Server Error"})
            finally:
                if not work.done():  # the client went away
                    self.lanes.cancel(job)
                    work.cancel()

        return StreamingResponse(events(), media_type=EVENT_STREAM, headers={"cache-control": "no-cache"})


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


def deployment_failure(app_name: str) -> str:
    """Why an application failed to deploy, as its deployments report it: the last line of their
    replicas' traceback (e.g. `CheckpointError: ...`), not the controller's whole message."""
    app = serve.status().applications.get(app_name)
    messages = [d.message for d in app.deployments.values() if d.message] if app else []
    lines = [line.strip() for message in messages for line in message.splitlines() if line.strip()]
    causes = [line for line in lines if "Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0]]
    return causes[-1] if causes else (lines[-1] if lines else f"application {app_name!r} did not start")
