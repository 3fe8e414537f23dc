"""Training checkpoints: one `checkpoint.pt` per checkpoint folder, holding only tensors and
plain Python values so that it loads with torch.load(weights_only=True).

Ray Train writes each checkpoint folder under <storage>/<run name>/checkpoint-<step>;
`load_checkpoint` takes such a folder, the run folder (it picks the latest checkpoint), or
the file itself, on a local path or s3://, or an MLflow training run as `runs:/<run_id>`.
"""

from __future__ import annotations

import io
import posixpath
from pathlib import Path

import torch

from .training import TrainConfig, TrainState
from .unet import UNet, build_unet

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_PREFIX = "checkpoint-"


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:09d}"  # sorts by step


def save_checkpoint(directory: str | Path, state: TrainState, config: TrainConfig, **extra) -> Path:
    """Write the full training state: model, EMA, optimizer, step, schedule, config, RNG."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    payload = {
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "step": state.step,
        "betas": state.schedule.betas,
        "config": config.to_dict(),
        "rng": rng,
        **extra,
    }
    path = Path(directory) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def restore_state(payload: dict, state: TrainState) -> None:
    """Load a checkpoint payload into a freshly built TrainState (same config)."""
    state.model.load_state_dict(payload["model"])
    state.ema.load_state_dict(payload["ema"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.step = payload["step"]
    torch.set_rng_state(payload["rng"]["torch"])
    if "cuda" in payload["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])


def resolve_mlflow_uri(uri: str) -> str:
    """`runs:/<run_id>`: the latest checkpoint of that MLflow training run (its checkpoint_uri tag)."""
    from mlflow.tracking import MlflowClient

    run_id = uri[len("runs:/") :].strip("/").split("/")[0]
    tag = MlflowClient().get_run(run_id).data.tags.get("checkpoint_uri")
    if not tag:
        raise FileNotFoundError(f"MLflow run {run_id} has no checkpoint_uri tag: it has not checkpointed yet")
    return tag


def read_checkpoint(path_or_uri: str | Path, endpoint_url: str | None = None) -> dict:
    """The payload of a checkpoint file, checkpoint folder, run folder (latest checkpoint) or
    MLflow training run (`runs:/<run_id>`)."""
    from pyarrow import fs as pafs

    from .data.storage import open_location

    uri = str(path_or_uri)
    if uri.startswith("runs:/"):
        uri = resolve_mlflow_uri(uri)
    location = open_location(uri, endpoint_url, check=False)

    info = location.fs.get_file_info(location.path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no checkpoint at {uri}: give a checkpoint.pt, a checkpoint folder or a run folder")
    path = location.path
    if info.type == pafs.FileType.Directory and not location.exists(CHECKPOINT_FILE):
        entries = location.fs.get_file_info(pafs.FileSelector(location.path))
        names = sorted(e.base_name for e in entries if e.base_name.startswith(CHECKPOINT_PREFIX))
        names = [n for n in names if location.exists(posixpath.join(n, CHECKPOINT_FILE))]
        if not names:
            raise FileNotFoundError(f"{uri} holds no {CHECKPOINT_PREFIX}* folder with a {CHECKPOINT_FILE}")
        path = location.join(names[-1])
    if location.fs.get_file_info(path).type == pafs.FileType.Directory:
        path = posixpath.join(path, CHECKPOINT_FILE)
    with location.fs.open_input_stream(path) as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def load_checkpoint(path_or_uri: str | Path, endpoint_url: str | None = None) -> tuple[UNet, UNet, TrainConfig]:
    """(model, EMA model, config) from a checkpoint, without Ray; both models in eval mode on the CPU."""
    payload = read_checkpoint(path_or_uri, endpoint_url)
    config = TrainConfig(**payload["config"])
    model = build_unet(config.model, dropout=config.dropout)
    model.load_state_dict(payload["model"])
    ema_model = build_unet(config.model, dropout=config.dropout)
    ema_model.load_state_dict(payload["ema"])
    return model.eval(), ema_model.eval(), config
