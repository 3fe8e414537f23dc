"""Checkpoints behind URIs: s3://bucket/prefix (a checkpoint.pt, its folder or a run folder, as
on a local disk) and MLflow's runs:/<run_id> (the run's latest checkpoint). The format itself
is `diffusion.checkpoint`; this module only finds the bytes."""

from __future__ import annotations

import posixpath

from ..checkpoint import CHECKPOINT_FILE, CheckpointError, latest_checkpoint, parse_checkpoint, read_checkpoint
from .storage import open_location


def read_remote_checkpoint(uri: str, endpoint_url: str | None = None) -> dict:
    """The checked payload of the checkpoint a remote URI names."""
    if uri.startswith("runs:/"):
        from .tracking import checkpoint_of_run

        run_id = uri[len("runs:/") :].strip("/").split("/")[0]
        return read_checkpoint(checkpoint_of_run(run_id), endpoint_url)
    location = open_location(uri, endpoint_url, check=False)
    path = _checkpoint_file(location, uri)
    with location.fs.open_input_stream(path) as f:
        return parse_checkpoint(f.read(), uri if path == location.path else f"{uri}{path[len(location.path) :]}")


def _checkpoint_file(location, uri: str) -> str:
    from pyarrow import fs as pafs

    kind = location.fs.get_file_info(location.path).type
    if kind == pafs.FileType.NotFound:
        raise CheckpointError(f"no checkpoint at {uri}: give a checkpoint.pt, a checkpoint folder or a run folder")
    if kind == pafs.FileType.File:
        return location.path
    if location.exists(CHECKPOINT_FILE):
        return location.join(CHECKPOINT_FILE)
    entries = location.fs.get_file_info(pafs.FileSelector(location.path))
    complete = [e.base_name for e in entries if location.exists(posixpath.join(e.base_name, CHECKPOINT_FILE))]
    latest = latest_checkpoint(complete)
    if latest is None:
        raise CheckpointError(f"{uri} holds no checkpoint-<step> folder with a {CHECKPOINT_FILE}")
    return location.join(latest, CHECKPOINT_FILE)
