"""MLflow-native models without Ray: a checkpoint logged as an MLflow Model and registered,
loaded by MLflow alone and sampled; models:/ and runs:/<id>/<path> URIs wherever a checkpoint
goes (jobs/generate.py here, which starts no Ray); the run page in a browser; and the errors
for URIs that name nothing and for a registry the tracking store does not have."""

import os
import re
import shutil
import sys

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffusion.errors import OptionError
from diffusion.platform.checkpoint_uris import read_checkpoint
from helpers import cli, mlflow_images, registered_tiny_model, run_main


@pytest.fixture(scope="module")
def registry(tmp_path_factory, monkeypatch_module, new_mlflow_store):
    """A tiny model registered as `tiny` version 1 (`registered_tiny_model`), the store in this
    process's MLFLOW_TRACKING_URI: (store URI, run id)."""
    folder = tmp_path_factory.mktemp("registry")
    uri, run_id = registered_tiny_model(folder, new_mlflow_store(folder))
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", uri)
    return uri, run_id


def test_a_logged_model_loads_with_mlflow_alone_and_samples(registry):
    _, run_id = registry
    for model_uri in ("models:/tiny/1", "models:/tiny@final", f"runs:/{run_id}/model"):
        model = mlflow.pyfunc.load_model(model_uri)
        images = model.predict(pd.DataFrame({"seed": [1, 2, 3]}), params={"sampler": "ddim", "steps": 4})
        assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 1
        assert read_checkpoint(model_uri)["step"] == 0
    solver = model.predict(pd.DataFrame({"seed": [1, 2, 3]}), params={"sampler": "dpmpp_2m", "steps": 4})
    assert solver.shape == images.shape and not np.array_equal(solver, images)
    with pytest.raises(OptionError, match=r"eta must be in \[0, 1\], got 1.5"):  # the sampler's one definition
        model.predict(pd.DataFrame({"seed": [1]}), params={"steps": 4, "eta": 1.5})
    with pytest.raises(OptionError, match="this checkpoint is unconditional"):  # a class asked of it
        model.predict(pd.DataFrame({"seed": [1], "class": ["cat"]}), params={"steps": 4})
    signature = mlflow.models.get_model_info("models:/tiny/1").signature
    assert signature.inputs.input_names() == ["seed", "class"] and {"sampler", "steps", "eta", "guidance_scale"} <= {
        p.name for p in signature.params.params
    }


@pytest.mark.slow
def test_the_run_page_shows_the_models_and_the_sample_grid(registry, tmp_path):
    """Headless Chromium on `mlflow server` over the store: the run's overview, in MLflow's
    training view, lists the logged model at its step and the registered version, and beside it
    the sample grid is rendered (as an image fetched from the server, not a broken link)."""
    if shutil.which("chromium") is None:
        pytest.skip("browser check skipped: Chromium is absent (Debian: apt-get install chromium; .ci/run installs it)")
    uri, run_id = registry
    out, dom = tmp_path / "run.png", tmp_path / "run.html"
    proc = cli("tune/screenshot.py", "--run", run_id, "--out", out, "--dom-out", dom, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "beside its latest 'samples' image" in proc.stdout
    page = dom.read_text()
    assert re.search(r'href="#/experiments/\d+/models\?workflowType=machine_learning"', page)  # the training view
    assert "Logged models (1)" in page and ">Step<" in page
    assert re.search(r"</svg>tiny<div[^>]*registered_model_cell_version_tag.*?>v1<", page)
    (step,) = mlflow_images(mlflow.MlflowClient(uri), run_id, "samples")
    assert re.search(rf'<img alt="images/samples\+step\+{step}\+[^"]*\.png" src="blob:', page)
    with Image.open(out) as image:
        assert image.size == (2 * 1600, 2200) and np.asarray(image.convert("L")).std() > 5


def no_ray(tmp_path) -> str:
    """A PYTHONPATH on which `import ray` fails: a command that runs under it starts no Ray."""
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('this command must not import ray')\n")
    return os.pathsep.join([str(fake.parent), *sys.path])


@pytest.mark.slow
def test_generate_samples_a_registered_model_and_writes_the_labelled_figures(registry, tmp_path):
    uri, _ = registry
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.full((32, 32, 3), 40, np.uint8)).save(a)
    Image.fromarray(np.full((32, 32, 3), 220, np.uint8)).save(b)
    out = tmp_path / "out"
    args = ["--checkpoint", "models:/tiny/1", "--n", 4, "--steps", 3, "--batch-size", 4, "--out", out]
    args += ["--figures", "--figure-seeds", 2, "--images", a, b]
    proc = cli("jobs/generate.py", *args, MLFLOW_TRACKING_URI=uri, PYTHONPATH=no_ray(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(out / "samples.png").size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    assert "4/4" in proc.stderr  # the progress bar's total
    figures = {p.stem: Image.open(p) for p in (out / "figures").glob("*.png")}
    assert set(figures) == {"ddim_consistency", "ddim_interpolation", "ddpm_interpolation", "ddpm_sequence"}
    # Labelled grids of the 32-pixel images scaled up 3x: the consistency figure has a row for
    # each S <= T = 100 (10, 20, 50, 100) and a column for each seed; the DDPM interpolation
    # (without --full-figures) a row for t = T/10, and a column for each of the 9 lambdas between
    # its two images.
    tile = 3 * 32
    width, height = figures["ddim_consistency"].size
    assert 4 * tile < height < 5 * tile and 2 * tile < width
    width, height = figures["ddpm_interpolation"].size
    assert 11 * tile < width < 12 * tile and tile < height < 2 * tile
    assert (
        "two given images" in proc.stdout
        and "Consistency (DDIM fig. 5): one x_T a column; DDIM with S steps" in proc.stdout
    )


@pytest.mark.parametrize(
    "uri, message",
    [
        ("models:/tiny/99", "Model Version (name=tiny, version=99) not found"),
        ("models:/nosuch/1", "Registered Model with name=nosuch not found"),
        ("runs:/RUN/no-such-path", "Failed to download artifacts from path 'no-such-path'"),
    ],
)
def test_uris_that_name_nothing_are_one_line_errors(registry, tmp_path, uri, message):
    store, run_id = registry
    uri = uri.replace("RUN", run_id)
    proc = run_main("jobs/generate.py", "--checkpoint", uri, "--out", tmp_path / "x.png", MLFLOW_TRACKING_URI=store)
    last = proc.stderr.strip().splitlines()[-1]  # after MLflow's download progress, if any: no traceback
    assert proc.returncode == 1 and last.startswith("error: ") and message in last and "Traceback" not in proc.stderr
    assert "MLflow store" in last and not (tmp_path / "x.png").exists()


def test_registering_needs_a_store_with_a_registry(tmp_path):
    from diffusion.platform.shards import write_shards
    from diffusion.platform.sources import Source
    from diffusion.platform.storage import open_location

    chunks = [("train", np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int64))]
    write_shards(Source("synthetic", ["train"], ["c"], iter(chunks)), open_location(str(tmp_path / "data")), quiet=True)
    args = ["--preset", "tiny", "--data", tmp_path / "data", "--register-model", "tiny"]
    proc = run_main("jobs/train.py", *args, MLFLOW_TRACKING_URI=f"file:{tmp_path}/mlruns")
    assert proc.returncode == 2 and "--register-model needs a Model Registry" in proc.stderr
    assert "sqlite:///mlflow.db" in proc.stderr and "Ray" not in proc.stderr
