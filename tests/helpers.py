"""Test helpers: the project's command lines run as a user runs them, the shared CIFAR-10 copy,
free ports, checkpoints, and synthetic data sets written in the exact official layouts with
the arrays they must read back as."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from diffusion.images import from_uint8
from diffusion.platform.net import free_port  # noqa: F401 - re-exported for the tests
from diffusion.platform.sources import CIFAR10_SPLITS

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def cli_env(**extra: str) -> dict:
    """The environment of a command line run by a test: this one, with Ray's token auth off
    (a local head started by a test has none) and `extra` (MLFLOW_TRACKING_URI, RAY_ADDRESS, ...)."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled", **{k: str(v) for k, v in extra.items()}}


def cli(script: str, *args, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run one of the project's scripts (jobs/..., tune/..., bench/..., cluster/...) from the
    project root with `args`, as a user does; `env` adds environment variables."""
    cmd = [sys.executable, script, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)


def run_main(script: str, *args, ray: bool = False, **env: str) -> subprocess.CompletedProcess:
    """`cli` in this process: the script's `main(argv)` under the command lines' rules (one line
    and exit code 1 for bad input, 2 for a parser error), from the project root, with `env` added
    and its output captured. For the error paths and quick commands, where a fresh interpreter
    (torch, MLflow: seconds on a slow machine) is most of the cost. Unless `ray`, starting or
    joining Ray fails the test: these commands must stop before Ray starts."""
    import ray as ray_module

    from diffusion.platform.cli import exit_code

    module = script_module(script)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_environ(cli_env(**env)))
        stack.enter_context(_cwd(ROOT))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        if not ray:
            stack.enter_context(_ray_forbidden(ray_module))
        try:
            code = exit_code(lambda: module.main([str(a) for a in args])) or 0  # main() may return None
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())


def script_module(script: str):
    """A script of the project (jobs/train.py, ...) imported once as a module (its main is not run);
    its folder is importable while it loads, as when it runs (bench/ scripts import bench/core.py)."""
    import importlib.util

    name = "script_" + re.sub(r"\W", "_", script)
    if name not in sys.modules:
        path = ROOT / script
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = module = importlib.util.module_from_spec(spec)  # dataclasses look it up
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        finally:
            sys.path.remove(str(path.parent))
    return sys.modules[name]


@contextlib.contextmanager
def _environ(env: dict):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _cwd(path: Path):
    saved = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(saved)


@contextlib.contextmanager
def _ray_forbidden(ray_module):
    """Every path into a Ray cluster (diffusion.platform.resources.connect) asks ray.is_initialized
    and then calls ray.init: as if none were connected, and a call is a test failure."""

    def init(*args, **kwargs):
        raise AssertionError("the command started or joined Ray before refusing its input")

    saved = ray_module.is_initialized, ray_module.init
    ray_module.is_initialized, ray_module.init = (lambda: False), init
    try:
        yield
    finally:
        ray_module.is_initialized, ray_module.init = saved


def own_processes(marker: str) -> list:
    """This test process's descendants (the Ray it started, and that Ray's workers) whose command
    line contains `marker`: never another Ray's on the same machine (a user's training run)."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # gone since listed
            if marker in " ".join(p.cmdline()):
                found.append(p)
    return found


def post(url: str, body, raw: bool = False, content_type: str = "application/json"):
    """POST `body` (JSON, or bytes with raw) to a Serve endpoint: (status, headers, body bytes)."""
    import json
    import urllib.error
    import urllib.request

    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def npz(body: bytes) -> np.ndarray:
    """The images of an npz response."""
    return np.load(io.BytesIO(body))["images"]


def assert_machine_recorded(machine: dict) -> None:
    """A benchmark's CPU timing names the CPU, its vector extensions and the kernels torch picked."""
    import platform

    assert machine["cpu"] and machine["torch_cpu_capability"] and machine["torch_threads"] >= 1
    if platform.machine() == "x86_64":
        assert "avx2" in machine["vector_extensions"], machine  # every x86 machine CI runs on has AVX2


def cli_popen(script: str, *args, stdout=subprocess.PIPE, **env: str) -> subprocess.Popen:
    """`cli` for a command that runs until stopped (a server, a sweep to interrupt)."""
    cmd = [sys.executable, script, *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=cli_env(**env), stdout=stdout, stderr=subprocess.STDOUT, text=True)


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_cifar10(path: Path, per_batch: int = 6, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cifar-10-python.tar.gz: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta},
    each a pickled dict with b"data" (N x 3072: R, G, B planes of 32x32) and b"labels"."""
    rng = np.random.default_rng(seed)
    expected = {}
    with tarfile.open(path, "w:gz") as tar:
        meta = {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_cases_per_batch": per_batch}
        _add(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=2))
        for split, batches in CIFAR10_SPLITS.items():
            images, labels = [], []
            for batch in batches:
                hwc = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
                lab = rng.integers(0, 10, per_batch).tolist()
                data = hwc.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
                d = {
                    b"batch_label": batch.encode(),
                    b"labels": lab,
                    b"data": data,
                    b"filenames": [b"x.png"] * per_batch,
                }
                _add(tar, f"cifar-10-batches-py/{batch}", pickle.dumps(d, protocol=2))
                images.append(hwc)
                labels.extend(lab)
            expected[split] = (np.concatenate(images), np.asarray(labels))
    return expected


def write_stl10(path: Path, sizes=None, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """stl10_binary.tar.gz: stl10_binary/{train,test}_{X,y}.bin, unlabeled_X.bin, class_names.txt,
    fold_indices.txt; X is N x 3 x 96 x 96 uint8 with each plane column-major, y uint8 1..10."""
    sizes = sizes or {"train": 5, "test": 4, "unlabeled": 7}
    rng = np.random.default_rng(seed)
    expected = {}
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "stl10_binary/class_names.txt", "\n".join(STL_CLASSES).encode() + b"\n")
        _add(tar, "stl10_binary/fold_indices.txt", b"0 1 2\n")
        for split, n in sizes.items():
            hwc = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
            _add(tar, f"stl10_binary/{split}_X.bin", hwc.transpose(0, 3, 2, 1).tobytes())  # (N, C, W, H)
            labels = np.full(n, -1)
            if split != "unlabeled":
                labels = rng.integers(0, 10, n)
                _add(tar, f"stl10_binary/{split}_y.bin", (labels + 1).astype(np.uint8).tobytes())
            expected[split] = (hwc, labels)
    return expected


def cifar_subset_folder(dst: Path, per_class: dict[str, int]) -> Path:
    """The first per_class[split] JPEGs of every class of each split of the shared CIFAR-10
    copy, as dst/<split>/<class>/<file>.jpg (the caller skips where the copy is absent)."""
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(SHARED_CIFAR, "r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in per_class:
                continue
            key = (parts[0], parts[1])
            if counts.get(key, 0) < per_class[parts[0]]:
                counts[key] = counts.get(key, 0) + 1
                path = dst / member.name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tar.extractfile(member).read())
    return dst


TINY_CLASSES = ("cat", "dog", "ship")  # the class names of a class-conditional `tiny_checkpoint`


def tiny_checkpoint(
    path: Path, mlflow_run_id: str = "", num_timesteps: int = 1000, preset: str = "tiny", conditional: bool = False
) -> str:
    """A checkpoint of the `preset`'s UNet (tiny; digits for 8x8 grey images), untrained, with
    EMA weights perturbed from the zero initialisation, so that samples are not trivially equal;
    `conditional`: class-conditional on TINY_CLASSES (its class embedding perturbed too, so that
    the classes differ). A smaller `num_timesteps` (T) makes DDPM sampling and the papers'
    figures cheaper."""
    import torch

    from diffusion.checkpoint import save_checkpoint
    from diffusion.config import RECIPES
    from diffusion.training import build_state

    torch.manual_seed(0)
    config = RECIPES[preset].replace(num_timesteps=num_timesteps, num_classes=len(TINY_CLASSES) if conditional else 0)
    state = build_state(config, torch.device("cpu"))
    with torch.no_grad():
        for p in state.ema.ema_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    classes = {"classes": list(TINY_CLASSES)} if conditional else {}
    save_checkpoint(path, state, config, mlflow_run_id=mlflow_run_id, **classes)
    return str(path)


# The digits model of the tests' sample-quality claims (tests/test_quality.py): the digits data
# on a smaller UNet (8 -> 4, one ResBlock a level, ch 32 and 64: 701K parameters, 0.6x the digits
# UNet's cost a call), trained by the core alone for DIGITS_CI: the digits preset at a size CI
# affords, so a shorter warm-up and EMA, and no dropout, which slows a short run down.
# tests/fixtures/make_digits_model.py writes it to DIGITS_MODEL (EMA weights in fp16: 1.4 MB).
# Measured on a 2-core machine after the same 700 steps, FD-digits of 360 DDIM-10 / DDIM-50 (eta 0)
# samples: this UNet 74.7 / 39.8, the digits UNet 57.2 / 33.8; with ch_mult (1, 1) 358 / 468.
DIGITS_CI = dict(max_steps=700, warmup_steps=50, ema_decay=0.98, dropout=0.0)
DIGITS_CI_UNET = dict(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
DIGITS_MODEL = ROOT / "tests" / "fixtures" / "digits-ci"
# The same recipe conditioned on the ten digits (num_classes=10: class dropout 0.1, the null class;
# tests/fixtures/make_digits_model.py --classes), for the claims of classifier-free guidance.
DIGITS_CLASSES_MODEL = ROOT / "tests" / "fixtures" / "digits-ci-classes"


def train_digits(shards_uri: str, max_steps: int = DIGITS_CI["max_steps"], seed: int = 0, **changes):
    """The DIGITS_CI model (the recipe with `changes`: num_classes=10 for the class-conditional
    one) trained by the core alone (`diffusion.training.train_loop` on the train split held in
    memory; no Ray) for `max_steps`: (TrainState, recipe, held-out L_simple of the test split
    {"initial", "final", "final_ema"})."""
    import torch

    from diffusion.config import RECIPES
    from diffusion.platform.shards import ShardSet
    from diffusion.training import DeviceData, HeldoutSet, build_state, train_loop
    from diffusion.unet import UNetConfig

    recipe = RECIPES["digits"].replace(**{**DIGITS_CI, "max_steps": max_steps, **changes}, seed=seed)
    shards = ShardSet.open(shards_uri)
    train, test = (next(shards.iter_batches(len(shards), splits=[s])) for s in ("train", "test"))
    train, test = ({k: torch.tensor(v) for k, v in split.items()} for split in (train, test))
    unet = UNetConfig(**DIGITS_CI_UNET, dropout=recipe.dropout, num_classes=recipe.num_classes)
    state = build_state(recipe, torch.device("cpu"), unet=unet)
    heldout = HeldoutSet(
        from_uint8(test["image"].permute(0, 3, 1, 2)), recipe.num_timesteps, recipe.seed, test["label"]
    )
    initial = heldout.loss(state.model, state.schedule)
    data = DeviceData(train["image"], train["label"])
    train_loop(state, recipe, lambda: data.epoch(recipe.batch_size), recipe.max_steps)
    losses = {
        "initial": initial,
        "final": heldout.loss(state.model, state.schedule),
        "final_ema": heldout.loss(state.ema.ema_model, state.schedule),
    }
    return state, recipe, losses


def registered_tiny_model(folder: Path, uri: str, name: str = "tiny") -> tuple[str, str]:
    """The MLflow store at `uri` holding `tiny_checkpoint` (T = 100, in `folder`) logged as the MLflow
    Model `model` of a run and registered as version 1 of `name` (alias `final`), with a grid of
    its DDIM samples logged as the image `samples` at step 3: (store URI, run id)."""
    from diffusion.checkpoint import read_checkpoint
    from diffusion.config import SamplerSettings
    from diffusion.images import grid
    from diffusion.pipeline import Pipeline
    from diffusion.platform import tracking
    from diffusion.platform.settings import EXPERIMENT

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        checkpoint = Path(tiny_checkpoint(folder / "ckpt", num_timesteps=100)) / "checkpoint.pt"
        run = tracking.Run.create(EXPERIMENT, "registered", {"kind": "training"})
        tracking.register(name, "final", tracking.log_model(run, checkpoint, "model", (32, 32, 3)))
        samples = Pipeline.from_checkpoint(read_checkpoint(str(checkpoint)), 4).samples(
            range(4), SamplerSettings(steps=3)
        )
        run.log_image(grid(samples).numpy(), "samples", step=3)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return uri, run.id


def tiny_diffusers_folder(path: Path, num_timesteps: int = 1000, conditional: bool = False) -> str:
    """`tiny_checkpoint`'s EMA weights exported as a diffusers DDPMPipeline folder (published
    weights come in this layout); `conditional`: with its class embedding and class names."""
    from diffusion.checkpoint import betas_from, class_names, model_from, read_checkpoint, sampling_defaults
    from diffusion.convert import export_diffusers

    checkpoint = tiny_checkpoint(
        path.with_name(path.name + "-checkpoint"), num_timesteps=num_timesteps, conditional=conditional
    )
    payload = read_checkpoint(checkpoint)
    model, betas, defaults = model_from(payload), betas_from(payload), sampling_defaults(payload)
    return str(export_diffusers(model, betas, defaults, path, class_names(payload)))


def random_fid_inception(path: Path) -> Path:
    """A randomly initialised FID InceptionV3 saved as a weights file: NOT the real FID weights.
    Its BatchNorm statistics come from two batches of noise, so activations stay O(1)."""
    import torch

    from diffusion.fid import build_fid_inception

    torch.manual_seed(0)
    net = build_fid_inception()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the batches
    with torch.no_grad():
        for _ in range(2):
            net.train()(torch.rand(8, 3, 299, 299) * 2 - 1)
    torch.save(net.state_dict(), path)
    return path


def mlflow_images(client, run_id: str, key: str) -> dict[int, Path]:
    """The images a run logged with `log_image` under `key`, by step, downloaded."""
    found = {}
    for artifact in client.list_artifacts(run_id, "images"):
        m = re.fullmatch(rf"images/{re.escape(key)}\+step\+(\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png", artifact.path)
        if m:
            found[int(m[1])] = Path(client.download_artifacts(run_id, artifact.path, tempfile.mkdtemp()))
    return found
