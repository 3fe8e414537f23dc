"""Checkpoints at a URI: `read_checkpoint` takes what the core's does (a local file or folder,
published weights) and URIs. The format is `diffusion.checkpoint`; for a URI this module only
finds the bytes:

s3://bucket/prefix              a checkpoint.pt, its folder or a run folder, as on a local disk
runs:/<run_id>                  the latest checkpoint a training run recorded (best: its run folder's best)
runs:/<run_id>/<artifact path>  an artifact of a run: a logged MLflow Model (`model`, `best`) or a checkpoint
models:/<name>/<version>        a registered model version, or models:/<name>@<alias>
"""

from __future__ import annotations

import posixpath
import tempfile
from pathlib import Path

from .. import checkpoint as local
from ..checkpoint import CHECKPOINT_FILE, METRICS_FILE, CheckpointError, choose_checkpoint, is_uri, parse_checkpoint
from .run_folder import checkpoint_names
from .storage import open_location

MODEL_CHECKPOINT = Path("artifacts") / CHECKPOINT_FILE  # inside an MLflow Model folder of this project


def read_checkpoint(location: str | Path, which: str = "latest", *, endpoint_url: str | None = None) -> dict:
    """The checked payload of a checkpoint file, checkpoint folder, run folder (its latest or
    best checkpoint, by `which`), s3:// URI (at `endpoint_url`, default AWS_ENDPOINT_URL) or
    MLflow URI (runs:/<run_id>[/<path>], models:/<name>/<version or @alias>), or published
    weights (a diffusers folder, a DDPM reference state dict). The core's
    `diffusion.checkpoint.read_checkpoint(path, which)` reads the local ones alone."""
    uri = str(location)
    if not is_uri(uri):
        return local.read_checkpoint(uri, which)
    from . import tracking  # MLflow: only for a URI

    if uri.startswith("runs:/") and "/" not in uri[len("runs:/") :].strip("/"):
        checkpoint = tracking.checkpoint_of_run(uri[len("runs:/") :].strip("/"))
        folder = checkpoint if which == "latest" else posixpath.dirname(checkpoint)
        return read_checkpoint(folder, which, endpoint_url=endpoint_url)
    if uri.startswith(("runs:/", "models:/")):
        with tempfile.TemporaryDirectory() as d:
            downloaded = tracking.download(uri, d)
            if (downloaded / "MLmodel").is_file():  # an MLflow Model of this project: its checkpoint artifact
                downloaded = downloaded / MODEL_CHECKPOINT
            return local.read_checkpoint(downloaded, which)
    store = open_location(uri, endpoint_url, check=False)
    path = _checkpoint_file(store, uri, which)
    with store.fs.open_input_stream(path) as f:
        return parse_checkpoint(f.read(), uri if path == store.path else f"{uri}{path[len(store.path) :]}")


def _checkpoint_file(location, uri: str, which: str) -> str:
    from pyarrow import fs as pafs

    kind = location.fs.get_file_info(location.path).type
    if kind == pafs.FileType.NotFound:
        raise CheckpointError(f"no checkpoint at {uri}: give a checkpoint.pt, a checkpoint folder or a run folder")
    if kind == pafs.FileType.File:
        return location.path
    if location.exists(CHECKPOINT_FILE):
        return location.join(CHECKPOINT_FILE)
    complete = checkpoint_names(location)

    def metrics_of(name: str) -> str | None:
        metrics = posixpath.join(name, METRICS_FILE)
        return location.read_bytes(metrics).decode() if location.exists(metrics) else None

    return location.join(choose_checkpoint(complete, metrics_of, which, uri), CHECKPOINT_FILE)
