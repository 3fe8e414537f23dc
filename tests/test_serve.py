"""The Ray Serve app on 127.0.0.1, serving a tiny class-conditional model imported from a
diffusers DDPMPipeline folder (and, from the CLI, a run folder of this project), exercised with
real HTTP requests."""

import base64
import hashlib
import http.client
import io
import ipaddress
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import free_port, npz, own_processes, post, tiny_diffusers_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
T, LONG, MAX_REQUEST, MAX_QUEUED = 100, 50, 200, 200  # the service's T; its lanes and bounds in UNet calls


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    from ray import serve

    from diffusion.platform.serve import ServeArgs, build_app

    # Imported weights (a diffusers folder) of a tiny model with T = 100 (DDPM is quick enough for tests),
    # class-conditional on cat, dog and ship: a request that names no class draws class seed mod 3.
    checkpoint = tiny_diffusers_folder(
        tmp_path_factory.mktemp("imported") / "pipeline", num_timesteps=T, conditional=True
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = ServeArgs(
        checkpoint=checkpoint,
        batch_size=8,
        batch_wait_s=0.2,
        long_request_calls=LONG,
        max_request_calls=MAX_REQUEST,
        max_queued_calls=MAX_QUEUED,
    )
    serve.run(build_app(args), blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_a_keyed_service_answers_only_requests_that_send_its_key(service, tmp_path):
    """With api_key_sha256 set, every route needs `Authorization: Bearer KEY`: 401 without it or
    with another key; the replica holds only the key's hash."""
    from ray import serve

    from diffusion.platform.serve import ServeArgs, build_app

    key = "s3cret-key-of-the-test"
    args = ServeArgs(
        checkpoint=tiny_diffusers_folder(tmp_path / "pipeline", num_timesteps=T),
        api_key_sha256=hashlib.sha256(key.encode()).hexdigest(),
    )
    serve.run(build_app(args), name="keyed", route_prefix="/keyed", blocking=False)
    try:
        url = f"{service}/keyed"
        for headers in ({}, {"authorization": "Bearer another-key"}, {"authorization": key}):
            request = urllib.request.Request(f"{url}/healthz", headers=headers)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request)
            assert refused.value.code == 401 and refused.value.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer KEY" in json.loads(refused.value.read())["detail"]
        assert post(f"{url}/v1/samples", {"n": 1, "seed": 0})[0] == 401
        request = urllib.request.Request(f"{url}/healthz", headers={"authorization": f"Bearer {key}"})
        assert json.loads(urllib.request.urlopen(request).read())["status"] == "ok"
        assert json.loads(urllib.request.urlopen(f"{service}/healthz").read())["status"] == "ok"  # the other app: open
    finally:
        serve.delete("keyed")


def png_b64(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_health_and_schema(service):
    health = json.loads(urllib.request.urlopen(f"{service}/healthz").read())
    assert health.pop("queued_unet_calls") == health.pop("running_requests") == {"short": 0, "long": 0}
    assert health.pop("unet_calls") >= 0
    assert ipaddress.ip_address(health.pop("node"))  # the replica's node: which host answered
    assert health == {
        "status": "ok",
        "model": "tiny",
        "image_shape": [32, 32, 3],
        "num_timesteps": T,
        "classes": ["cat", "dog", "ship"],
        "weights": "ema",
    }
    schema = json.loads(urllib.request.urlopen(f"{service}/openapi.json").read())
    assert {"/v1/samples", "/v1/interpolations", "/v1/sequences", "/healthz"} <= set(schema["paths"])
    for route in ("/v1/samples", "/v1/interpolations", "/v1/sequences"):
        assert "text/event-stream" in schema["paths"][route]["post"]["responses"]["200"]["content"]


def test_sample_formats_decode_to_the_right_shapes(service):
    status, headers, body = post(f"{service}/v1/samples", {"n": 3, "seed": 10, "steps": 5, "format": "npz"})
    assert status == 200 and headers["x-seeds"] == "10,11,12"
    images = npz(body)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 1
    status, headers, body = post(f"{service}/v1/samples", {"seeds": [10, 11, 12], "steps": 5, "format": "json"})
    decoded = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in json.loads(body)["images"]]
    assert status == 200 and all(np.array_equal(a, b) for a, b in zip(decoded, images))
    status, headers, body = post(f"{service}/v1/samples", {"n": 4, "seed": 1, "steps": 5})
    assert status == 200 and headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(body)) as grid:
        assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)


def test_classes_are_drawn_from_every_seed_with_guidance_and_an_unknown_class_is_named(service):
    """Each class asked from every seed, guided; a seed and class give the same image alone and
    beside others (the conditional and null halves share the fixed batch shape); a class the
    model does not have is a 422 naming its classes."""
    body = {"seeds": [1, 2], "classes": ["ship", 0], "guidance_scale": 3.0, "steps": 5, "format": "npz"}
    status, headers, content = post(f"{service}/v1/samples", body)
    assert status == 200 and headers["x-seeds"] == "1,2,1,2" and headers["x-classes"] == "ship,ship,cat,cat"
    images = npz(content)
    assert images.shape == (4, 32, 32, 3) and not np.array_equal(images[0], images[2])  # ship and cat of seed 1
    alone = {"seeds": [2], "classes": "cat", "guidance_scale": 3.0, "steps": 5, "format": "npz"}
    status, headers, content = post(f"{service}/v1/samples", alone)
    assert status == 200 and headers["x-classes"] == "cat" and np.array_equal(npz(content)[0], images[3])
    status, _, content = post(f"{service}/v1/samples", {**alone, "guidance_scale": 1.0})
    assert status == 200 and not np.array_equal(npz(content)[0], images[3])  # guidance changes the image
    status, headers, _ = post(f"{service}/v1/samples", {"seeds": [4, 5], "steps": 2, "format": "npz"})
    assert status == 200 and headers["x-classes"] == "dog,ship"  # none asked: class seed mod 3
    for request, message in (
        ({"classes": ["horse"]}, "classes: no class 'horse': the model's 3 classes are 0 cat, 1 dog, 2 ship"),
        ({"classes": "0-3"}, "classes: no class '0-3'"),
        ({"classes": 1.5}, "classes"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"n": 40, "classes": "0-2"}, "classes x seeds make 120 images, more than the 64 of a request"),
    ):
        status, _, content = post(f"{service}/v1/samples", {"steps": 2, **request})
        assert status == 422 and message in content.decode(), (request, content)
    for route, body in (("sequences", {"seed": 3, "steps": 4}), ("interpolations", {"seeds": [1, 2], "steps": 4})):
        status, headers, _ = post(f"{service}/v1/{route}", {**body, "classes": "dog", "guidance_scale": 2.0})
        assert status == 200, (route, headers)
        status, _, content = post(f"{service}/v1/{route}", {**body, "classes": "horse"})
        assert status == 422 and "no class 'horse'" in content.decode(), route


def test_concurrent_requests_share_model_batches_and_seeds_stay_identical(service):
    def one(seed):
        return post(f"{service}/v1/samples", {"seeds": [seed], "steps": 5, "eta": 0.5, "format": "npz"})

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(100, 116)))
    assert all(status == 200 for status, _, _ in results)
    sizes = [int(headers["x-batch-requests"]) for _, headers, _ in results]
    batches = sum(1 / s for s in sizes)  # each batch of k requests contributes k * (1/k)
    assert max(sizes) > 1 and round(batches) < 16, sizes
    for seed in (100, 107, 115):  # alone, the same image bit for bit
        status, headers, body = one(seed)
        assert status == 200 and headers["x-batch-requests"] == "1"
        assert np.array_equal(npz(body), npz(results[seed - 100][2]))


@pytest.mark.parametrize(
    "body, status, field",
    [
        (b"{not json", 400, "not valid JSON"),
        ({"n": 0}, 422, "n"),
        ({"n": 65}, 422, "n"),
        ({"steps": "many"}, 422, "steps"),
        ({"steps": 1001}, 422, "steps"),
        ({"eta": -0.1}, 422, "eta"),
        ({"eta": 1.5}, 422, "eta: Input should be less than or equal to 1"),
        ({"sampler": "euler"}, 422, "sampler"),
        ({"format": "gif"}, 422, "format"),
        ({"seeds": [1, 2], "n": 3}, 422, "n"),
        ({"seeds": [-1]}, 422, "seeds"),
        ({"seed": 1, "seeds": [1]}, 422, "seed"),
        ({"temperature": 1}, 422, "temperature"),
        # JSON numbers only where numbers are meant, finite, in range; bodies that parse.
        (b'{"eta": NaN}', 400, "NaN is not a JSON number"),
        (b'{"eta": Infinity}', 400, "Infinity is not a JSON number"),
        (b'{"steps": -Infinity}', 400, "-Infinity is not a JSON number"),
        (b'{"seeds": [1e400]}', 400, "1e400 is out of range"),
        ({"n": "3"}, 422, "n: Input should be a valid integer (got '3')"),
        ({"n": True}, 422, "n: Input should be a valid integer (got True)"),
        ({"n": 2.0}, 422, "n: Input should be a valid integer"),
        ({"seed": 2**63 - 1, "n": 2}, 422, "seed + n - 1 must stay below 2**63"),
        ({"seeds": [2**63]}, 422, "seeds"),
        ({"clip": 1}, 422, "clip: Input should be a valid boolean"),
        (b"[" * 10_000 + b"]" * 10_000, 422, "nests deeper than 32 levels"),
        (b'{"n": 1, "pad": "\xff\xfe"}', 400, "not UTF-8 text: byte 0xff at position 17"),
        ({"sampler": "ddim", "eta": 0.5, "variance": "beta"}, 422, "sigma-hat, defined for eta = 1"),
        ({"sampler": "dpmpp_2m", "eta": 1}, 422, "DPM-Solver++(2M) is deterministic"),
        ({"steps": 101}, 422, "steps must be in [1, 100] (the model's T)"),
        ({"sampler": "ddpm", "n": 24}, 422, "needs 300 UNet calls"),  # 3 batches x 100: for the batch job
    ],
)
def test_malformed_sample_requests_get_a_4xx_naming_the_field(service, body, status, field):
    got, _, text = post(f"{service}/v1/samples", body, raw=isinstance(body, bytes))
    assert got == status and field in text.decode(), text
    assert isinstance(json.loads(text)["detail"], (str, list)) and len(text) < 2000  # JSON, no echo of the body
    ok, _, _ = post(f"{service}/v1/samples", {"n": 1, "seed": 0, "steps": 2, "format": "npz"})
    assert ok == 200  # the replica keeps serving


def test_a_large_body_gets_a_413_without_being_echoed(service):
    got, _, text = post(f"{service}/v1/samples", b'{"pad": "' + b"x" * (5 << 20) + b'"}', raw=True)
    assert got == 413 and "larger than 4194304 bytes" in text.decode() and len(text) < 200


def replica_rss() -> int:
    (replica,) = own_processes("ServeReplica:default:DiffusionService")
    return replica.memory_info().rss


def test_an_upload_declaring_a_huge_image_is_refused_before_decoding(service):
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")  # 144 million pixels in a few KB
    assert len(bomb.getvalue()) < 64_000
    body = {"mode": "ddpm", "images": [base64.b64encode(bomb.getvalue()).decode()] * 2, "t": 5}
    before = replica_rss()
    status, _, text = post(f"{service}/v1/interpolations", body)
    assert status == 422 and "image is 12000x12000, the model needs 32x32" in text.decode()
    assert replica_rss() - before < 50 * 2**20  # decoding it would take 432 MB as RGB


def test_a_long_ddpm_request_holds_back_neither_health_nor_cheap_requests(service):
    """DDPM over all T = 100 steps (100 UNet calls: the long lane) takes seconds on a CPU;
    meanwhile /healthz and a one-step request (the short lane) answer at once, and more long
    work than the lane may queue gets a 503."""
    long = {"sampler": "ddpm", "n": 4, "seed": 1, "format": "npz"}
    with ThreadPoolExecutor(1) as pool:
        ddpm = pool.submit(post, f"{service}/v1/samples", long)
        deadline = time.time() + 60
        while json.loads(urllib.request.urlopen(f"{service}/healthz").read())["queued_unet_calls"]["long"] == 0:
            assert time.time() < deadline and not ddpm.done()
            time.sleep(0.1)
        urllib.request.urlopen(f"{service}/healthz", timeout=60).read()
        status, _, _ = post(f"{service}/v1/samples", {"n": 1, "seed": 3, "steps": 1, "format": "npz"})
        busy, headers, text = post(f"{service}/v1/samples", {**long, "n": 16})  # 100 + 200 > 200 queued
        assert status == 200 and not ddpm.done()  # answered while the long request still runs
        assert busy == 503 and headers["retry-after"] and "queued in the long lane" in text.decode()
        status, _, body = ddpm.result(timeout=300)
    assert status == 200 and npz(body).shape == (4, 32, 32, 3)


def health(service: str) -> dict:
    return json.loads(urllib.request.urlopen(f"{service}/healthz", timeout=60).read())


def idle(service: str, deadline: float) -> dict:
    """/healthz once no request runs (earlier tests' work has ended)."""
    while sum((now := health(service))["running_requests"].values()):
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    return now


def calls_reach(service: str, calls: int, deadline: float) -> None:
    while health(service)["unet_calls"] < calls:
        assert time.monotonic() < deadline
        time.sleep(0.05)


class Client:
    """A POST to the service on a connection of its own, which `hang_up` drops mid-request."""

    def __init__(self, service: str, body: dict, streamed: bool = False):
        host, port = service.removeprefix("http://").split(":")
        headers = {"content-type": "application/json", **({"accept": "text/event-stream"} if streamed else {})}
        self.connection = http.client.HTTPConnection(host, int(port), timeout=60)
        self.connection.request("POST", "/v1/samples", json.dumps(body), headers)
        self.socket = self.connection.sock

    def hang_up(self) -> None:
        self.socket.shutdown(socket.SHUT_RDWR)
        self.connection.close()


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "event-stream"])
def test_a_client_that_disconnects_stops_its_ddpm_chain_and_frees_the_lane(service, streamed):
    """A DDPM request (T = 100 model calls) whose client goes away mid-chain stops within a few
    model calls (the replica's count of UNet calls stops growing) and leaves its lane empty."""
    deadline = time.monotonic() + 120
    before = idle(service, deadline)
    client = Client(service, {"sampler": "ddpm", "n": 1, "seed": 9}, streamed)
    if streamed:  # progress arrives while the chain runs: neither the middlewares nor the proxy buffer it
        response = client.connection.getresponse()
        assert response.status == 200 and response.readline() == b"event: progress\n"
    calls_reach(service, before["unet_calls"] + 3, deadline)
    client.hang_up()
    at_hang_up = health(service)["unet_calls"]
    while (after := health(service))["running_requests"]["long"] or after["queued_unet_calls"]["long"]:
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    assert after["unet_calls"] - at_hang_up <= 5 and after["unet_calls"] - before["unet_calls"] < T, (at_hang_up, after)
    time.sleep(0.3)  # a few model calls' time: the count no longer grows
    assert health(service)["unet_calls"] == after["unet_calls"]


def test_a_batch_runs_on_for_the_request_still_waiting_for_it(service):
    """Two requests sampled as one batch (25 DDIM steps): one client goes away, the other gets
    its image after every step of the batch."""
    deadline = time.monotonic() + 120
    before = idle(service, deadline)
    body = {"steps": 25, "eta": 0.5, "format": "npz"}
    with ThreadPoolExecutor(1) as pool:
        gone = Client(service, {**body, "seeds": [31]})
        kept = pool.submit(post, f"{service}/v1/samples", {**body, "seeds": [32]})
        calls_reach(service, before["unet_calls"] + 2, deadline)
        gone.hang_up()
        status, headers, image = kept.result(timeout=120)
    assert status == 200 and headers["x-batch-requests"] == "2" and npz(image).shape == (1, 32, 32, 3)
    assert idle(service, deadline)["unet_calls"] - before["unet_calls"] == 25


def sse_events(text: bytes) -> list[tuple[str, dict]]:
    """(event, data) of each Server-Sent Event of a stream."""
    fields = [dict(line.split(": ", 1) for line in block.splitlines()) for block in text.decode().split("\n\n")[:-1]]
    return [(f["event"], json.loads(f["data"])) for f in fields]


def streamed(url: str, body: dict) -> list[tuple[str, dict]]:
    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=120) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.read())


def test_an_event_stream_reports_every_step_then_the_images_of_the_plain_request(service):
    body = {"seeds": [21, 22], "steps": 5, "eta": 1.0}
    *progress, (last, result) = streamed(f"{service}/v1/samples", body)
    assert progress == [("progress", {"step": i, "steps": 5}) for i in range(1, 6)]
    assert last == "result" and result["x-seeds"] == "21,22" and result["x-batch-requests"] == "1"
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in result["images"]]
    plain = npz(post(f"{service}/v1/samples", {**body, "format": "npz"})[2])
    assert np.array_equal(np.stack(images), plain)
    *progress, (last, result) = streamed(f"{service}/v1/sequences", {"seed": 3, "steps": 5, "record": [80, 0]})
    assert [data["step"] for _, data in progress] == [1, 2, 3, 4, 5] and last == "result"
    assert result["x-timesteps"] == "80,0" and len(result["images"]) == 2
    *progress, (last, result) = streamed(f"{service}/v1/interpolations", {"seeds": [1, 2], "count": 3, "steps": 5})
    assert len(progress) == 5 and last == "result" and result["x-lambdas"] == "0,0.5,1" and len(result["images"]) == 3
    events = streamed(f"{service}/v1/sequences", {"seed": 3, "steps": 5, "record": [99]})
    assert events[-1][0] == "error" and events[-1][1]["status"] == 422 and "record" in events[-1][1]["detail"]
    # DPM-Solver++(2M): a call a step of tau as DDIM, streamed as the plain request, other images than DDIM's.
    body = {"seeds": [21], "steps": 4, "sampler": "dpmpp_2m"}
    *progress, (last, result) = streamed(f"{service}/v1/samples", body)
    assert progress == [("progress", {"step": i, "steps": 4}) for i in range(1, 5)] and last == "result"
    solver = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["images"][0]))))
    assert np.array_equal(solver[None], npz(post(f"{service}/v1/samples", {**body, "format": "npz"})[2]))
    ddim = npz(post(f"{service}/v1/samples", {**body, "sampler": "ddim", "format": "npz"})[2])
    assert np.abs(ddim[0].astype(int) - solver).max() > 2


@pytest.mark.parametrize("route", ["samples", "sequences"])
def test_steps_with_ddpm_is_refused_with_the_ddim_way_to_take_fewer(service, route):
    status, _, text = post(f"{service}/v1/{route}", {"sampler": "ddpm", "steps": 10})
    (detail,) = json.loads(text)["detail"]
    assert status == 422 and detail.startswith("steps is for DDIM and DPM-Solver++: DDPM always takes all T steps")
    assert detail.endswith("use sampler ddim with eta 1 and steps 10")  # the rule's one message, as the CLIs say it


def test_a_replica_that_cannot_start_is_named_with_its_cause(service, tmp_path):
    from ray import serve

    from diffusion.platform.serve import ServeArgs, build_app, deployment_failure

    with pytest.raises(RuntimeError):
        serve.run(build_app(ServeArgs(checkpoint=str(tmp_path / "none"))), name="broken", route_prefix="/broken")
    cause = deployment_failure("broken")
    assert "CheckpointError: no checkpoint at" in cause and str(tmp_path / "none") in cause, cause
    serve.delete("broken")


def test_a_body_not_sent_as_json_gets_a_415_naming_the_header(service):
    got, _, text = post(f"{service}/v1/samples", {"n": 1}, content_type="application/x-www-form-urlencoded")
    assert got == 415 and "Content-Type: application/json" in text.decode(), text  # what `curl -d` sends


def test_interpolations(service):
    status, headers, body = post(
        f"{service}/v1/interpolations", {"mode": "ddim", "seeds": [1, 2], "count": 5, "steps": 5, "format": "npz"}
    )
    assert status == 200 and npz(body).shape == (5, 32, 32, 3) and headers["x-lambdas"] == "0,0.25,0.5,0.75,1"
    ends = npz(post(f"{service}/v1/samples", {"seeds": [1, 2], "steps": 5, "format": "npz"})[2])
    assert np.abs(npz(body)[[0, 4]].astype(int) - ends.astype(int)).max() <= 1  # lambda 0 and 1 are the seeds' samples
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2))
    status, _, body = post(
        f"{service}/v1/interpolations",
        {"mode": "ddpm", "images": [png_b64(a), png_b64(b)], "lambdas": [0, 0.5, 1], "t": 5, "format": "npz"},
    )
    assert status == 200 and npz(body).shape == (3, 32, 32, 3)
    small = png_b64(np.zeros((16, 16, 3), dtype=np.uint8))
    for body, field in [
        ({"mode": "ddpm", "images": [small, small], "t": 5}, "images[0]: image is 16x16, the model needs 32x32"),
        ({"mode": "ddpm", "images": ["%%%", "%%%"], "t": 5}, "images[0]: not valid base64"),
        ({"mode": "ddpm", "images": [png_b64(a), png_b64(b)], "lambdas": [float("nan")]}, "NaN is not a JSON number"),
        ({"mode": "ddim"}, "seeds"),
        ({"mode": "ddim", "seeds": [1, 2], "lambdas": [1.5]}, "lambdas"),
        ({"mode": "ddpm", "images": [png_b64(a), png_b64(b)], "t": T}, "t must be a 0-based timestep below"),
    ]:
        status, _, text = post(f"{service}/v1/interpolations", body)
        assert status == (400 if "JSON number" in field else 422) and field in text.decode(), text
        json.loads(text)


def test_sequences(service):
    status, headers, body = post(f"{service}/v1/sequences", {"seed": 3, "steps": 20, "format": "npz"})
    timesteps = [int(t) for t in headers["x-timesteps"].split(",")]
    assert status == 200 and len(timesteps) == 10 and timesteps == sorted(timesteps, reverse=True)
    assert npz(body).shape == (10, 32, 32, 3)
    status, headers, body = post(
        f"{service}/v1/sequences", {"seed": 3, "steps": 20, "record": [0, 50, 95], "show": "pred_x0", "format": "npz"}
    )
    assert status == 200 and headers["x-timesteps"] == "95,50,0" and npz(body).shape == (3, 32, 32, 3)
    status, _, text = post(f"{service}/v1/sequences", {"seed": 3, "steps": 10, "record": [99]})
    assert status == 422 and "record" in text.decode()


def test_serve_config_file_is_a_valid_serve_application(tmp_path):
    import inspect
    import typing

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from diffusion.platform.serve import build_app, deployment_options, serve_args

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    # `serve run` calls a builder of one parameter with the `args:` dict as it is (the parameter's
    # annotation is not a pydantic model); the builder checks it (`serve_args`).
    (param,) = inspect.signature(build_app).parameters.values()
    assert dict in typing.get_args(param.annotation)
    args = serve_args({**config["applications"][0]["args"], "max_replicas": 4, "gpus": 1})
    assert serve_args({"checkpoint": "runs/x", "gpus": "1", "weights": "raw"}).gpus == 1.0  # `serve run k=v` strings
    with pytest.raises(ValueError, match="batch_size"):
        serve_args({"checkpoint": "runs/x", "batch_size": 0})
    options = deployment_options(args)
    assert options["ray_actor_options"]["num_gpus"] == 1 and options["autoscaling_config"]["max_replicas"] == 4
