"""The Ray Serve app on 127.0.0.1 with a tiny checkpoint, exercised with real HTTP requests."""

import base64
import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import free_port, tiny_checkpoint

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    from ray import serve

    from diffusion.serve import build_app

    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(checkpoint, batch_size=8, batch_wait_s=0.2), blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url, body, raw=False, content_type="application/json"):
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def npz(body):
    return np.load(io.BytesIO(body))["images"]


def png_b64(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_health_and_schema(service):
    health = json.loads(urllib.request.urlopen(f"{service}/healthz").read())
    assert health == {"status": "ok", "model": "tiny", "image_shape": [32, 32, 3], "weights": "ema"}
    schema = json.loads(urllib.request.urlopen(f"{service}/openapi.json").read())
    assert {"/v1/samples", "/v1/interpolations", "/v1/sequences", "/healthz"} <= set(schema["paths"])


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
        assert headers["x-batch-requests"] == "1"
        assert np.array_equal(npz(body), npz(results[seed - 100][2]))


@pytest.mark.parametrize(
    "body, status, field",
    [
        (b"{not json", 422, "json"),
        ({"n": 0}, 422, "n"),
        ({"n": 65}, 422, "n"),
        ({"steps": "many"}, 422, "steps"),
        ({"steps": 1001}, 422, "steps"),
        ({"eta": -0.1}, 422, "eta"),
        ({"sampler": "euler"}, 422, "sampler"),
        ({"format": "gif"}, 422, "format"),
        ({"seeds": [1, 2], "n": 3}, 422, "n"),
        ({"seeds": [-1]}, 422, "seeds"),
        ({"seed": 1, "seeds": [1]}, 422, "seed"),
        ({"temperature": 1}, 422, "temperature"),
    ],
)
def test_malformed_sample_requests_get_a_4xx_naming_the_field(service, body, status, field):
    got, _, text = post(f"{service}/v1/samples", body, raw=isinstance(body, bytes))
    assert got == status and field in text.decode(), text
    ok, _, _ = post(f"{service}/v1/samples", {"n": 1, "seed": 0, "steps": 2, "format": "npz"})
    assert ok == 200  # the replica keeps serving


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
        ({"mode": "ddpm", "images": [small, small]}, "images[0]"),
        ({"mode": "ddpm", "images": ["%%%", "%%%"]}, "images[0]"),
        ({"mode": "ddim"}, "seeds"),
        ({"mode": "ddim", "seeds": [1, 2], "lambdas": [1.5]}, "lambdas"),
        ({"mode": "ddpm", "images": [png_b64(a), png_b64(b)], "t": 1000}, "t"),
    ]:
        status, _, text = post(f"{service}/v1/interpolations", body)
        assert status == 422 and field in text.decode(), text


def test_sequences(service):
    status, headers, body = post(f"{service}/v1/sequences", {"seed": 3, "steps": 20, "format": "npz"})
    timesteps = [int(t) for t in headers["x-timesteps"].split(",")]
    assert status == 200 and len(timesteps) == 10 and timesteps == sorted(timesteps, reverse=True)
    assert npz(body).shape == (10, 32, 32, 3)
    status, headers, body = post(
        f"{service}/v1/sequences", {"seed": 3, "steps": 20, "record": [0, 500, 950], "show": "pred_x0", "format": "npz"}
    )
    assert status == 200 and headers["x-timesteps"] == "950,500,0" and npz(body).shape == (3, 32, 32, 3)
    status, _, text = post(f"{service}/v1/sequences", {"seed": 3, "steps": 10, "record": [999]})
    assert status == 422 and "record" in text.decode()


def test_serve_cli_serves_a_run_folder_and_stops_on_sigterm(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tiny_checkpoint(tmp_path / "runs" / "demo" / "checkpoint-000000010")
    port = free_port()
    env = dict(os.environ, RAY_ADDRESS="local", RAY_AUTH_MODE="disabled")  # its own Ray, not the tests'
    proc = subprocess.Popen(
        [
            sys.executable,
            "jobs/serve.py",
            "--checkpoint",
            str(tmp_path / "runs" / "demo"),
            "--port",
            str(port),
            "--batch-size",
            "4",
            "--max-replicas",
            "2",
        ],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(1)
        status, _, body = post(f"http://127.0.0.1:{port}/v1/samples", {"n": 2, "seed": 0, "steps": 3, "format": "npz"})
        assert status == 200 and npz(body).shape == (2, 32, 32, 3)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    assert "replicas 1..2 autoscaled" in proc.stdout.read()


def test_serve_config_file_is_a_valid_serve_application(tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from diffusion.serve import build_app

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    args = {**config["applications"][0]["args"], "max_replicas": 4, "gpus": 1}
    deployment = build_app(**args)._bound_deployment
    assert deployment.ray_actor_options["num_gpus"] == 1
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
