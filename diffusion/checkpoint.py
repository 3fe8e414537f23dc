"""The checkpoint format: one `checkpoint.pt` per checkpoint folder, holding only tensors and
plain Python values, so that it loads with torch.load(weights_only=True):

    model, ema   state dicts of the UNet (raw and EMA weights)
    unet         its UNetConfig as a dict (absent in checkpoints written before it was recorded:
                 their preset, with the symmetric downsampling padding they were trained with)
    betas        the float64 beta schedule (T,), which fixes T and the sampler's coefficients
    recipe       the `Recipe` as a dict: what the model is and how it was trained
    run          optional: the run settings it was trained with, as information (storage,
                 workers, cadence, ...); nothing that loads a checkpoint needs them
    step, optimizer, mlflow_run_id (no generator state: each training step seeds its own draws,
                 `diffusion.training.seed_step`)
    classes      the class names of a class-conditional model (`unet` num_classes > 0), index by
                 index: the data set's (its manifest's `classes`)
    sampling     optional sampling defaults of imported weights: {"variance", "clip"}

Checkpoints written before the recipe was split from the run settings hold one flat `config`
instead of `recipe` and `run`: its recipe fields are the recipe, the rest is ignored.

Ray Train writes each folder as <storage>/<run name>/checkpoint-<step>, with a metrics.json
beside the checkpoint.pt: the report's metrics and its score (held-out L_simple, or FID when
training measures it), by which Ray Train keeps the best checkpoints. `read_checkpoint` takes a
checkpoint.pt, its folder or a run folder (its latest checkpoint, or its best) on a local disk
with torch alone, and published weights in their own layouts (`diffusion.convert`: a diffusers
folder, a DDPM reference state dict). URIs (s3://..., runs:/<id>, models:/<name>/<version>) are
the platform's: `diffusion.platform.checkpoint_uris.read_checkpoint` takes those and local paths.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from .config import RECIPE_FIELDS, WHICH, Recipe
from .errors import InputError
from .unet import UNET_CONFIGS, UNet, UNetConfig

LEGACY_DOWNSAMPLE_PADDING = (1, 1, 1, 1)  # a conv with padding 1: every checkpoint before `unet` was recorded
SAMPLING_DEFAULTS = {"variance": "posterior", "clip": False}  # the papers' equations; DDPM's code clips

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
CHECKPOINT_PREFIX = "checkpoint-"
REQUIRED_KEYS = ("model", "ema", "betas", "step")


class CheckpointError(InputError, ValueError):
    """A checkpoint that cannot be used; the message names the file, what is wrong and the fix."""


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:09d}"  # sorts by step


def save_checkpoint(
    directory: str | Path, state, recipe: Recipe, metrics: dict | None = None, score: str = "heldout_loss", **extra
) -> Path:
    """Write the full training state (a `diffusion.training.TrainState`): model, EMA, optimizer,
    step, schedule, recipe, and `extra` entries (`run`: the run settings); with `metrics`, also
    metrics.json (the metrics, and the one named `score` that ranks checkpoints, lower better).
    The files appear under their names only once complete."""
    payload = {
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "unet": state.model.config.to_dict(),
        "optimizer": state.optimizer.state_dict(),
        "step": state.step,
        "betas": state.schedule.betas.cpu(),
        "recipe": recipe.to_dict(),
        **extra,
    }
    path = Path(directory) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if metrics is not None:
        ranked_by = {"name": score, "value": metrics.get(score)}
        (path.parent / METRICS_FILE).write_text(
            json.dumps({"step": state.step, "metrics": metrics, "score": ranked_by})
        )
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)
    return path


def restore_state(payload: dict, state) -> None:
    """Load a checkpoint payload into a freshly built TrainState (same config)."""
    state.model.load_state_dict(payload["model"])
    state.ema.load_state_dict(payload["ema"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.step = payload["step"]


def parse_checkpoint(data: bytes, origin: str) -> dict:
    """The payload in the bytes of a checkpoint.pt read from `origin`, checked: anything but a
    project checkpoint that loads with weights_only=True is a CheckpointError naming `origin`."""
    fix = "give a checkpoint.pt written by jobs/train.py, its checkpoint-<step> folder or the run folder"
    if not data:
        raise CheckpointError(f"{origin} is empty: the file was truncated or never written; {fix}")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # PyTorch's own message suggests weights_only=False, which would run the file's code: never.
        raise CheckpointError(
            f"{origin} holds Python objects other than tensors and plain values, which are never loaded "
            f"(loading them could run code from the file); {fix}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:100]
        raise CheckpointError(
            f"{origin} is not a readable PyTorch checkpoint, truncated or damaged ({first}); {fix}"
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{origin} holds a {type(payload).__name__}, not a checkpoint dict; {fix}")
    from .convert import ConversionError, is_reference_state_dict, payload_from_reference

    if is_reference_state_dict(payload):
        try:
            return payload_from_reference(payload, origin)
        except ConversionError as e:
            raise CheckpointError(str(e)) from None
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if "recipe" not in payload and "config" not in payload:  # `config`: a checkpoint of before the split
        missing.append("recipe")
    if missing:
        raise CheckpointError(f"{origin} lacks {missing}: it is not a training checkpoint of this project; {fix}")
    try:
        recipe_of(payload)
        config = unet_config_of(payload)
        class_names(payload)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise CheckpointError(f"{origin} has a config this version cannot read ({e}); {fix}") from None
    with torch.device("meta"):  # the shapes of the UNet it describes, without allocating it
        expected = {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
    for weights in ("model", "ema"):
        state = payload[weights]
        got = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
        if got != expected:
            wrong = sorted(set(expected) ^ set(got)) + sorted(k for k in expected if k in got and got[k] != expected[k])
            raise CheckpointError(
                f"{origin}: its {weights!r} weights do not fit the UNet its config describes ({len(wrong)} tensors "
                f"differ, e.g. {wrong[:3]}): the file is damaged or was edited; {fix}"
            )
    return payload


def choose_checkpoint(names: list[str], metrics_of: Callable[[str], str | None], which: str, where: str) -> str:
    """The checkpoint-<step> folder of a run folder: the latest, or the best (the lowest score in
    its metrics.json, read through `metrics_of(name)`); CheckpointError when there is none."""
    from .convert import understood

    if which not in WHICH:
        raise CheckpointError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    found = sorted(n for n in names if n.startswith(CHECKPOINT_PREFIX))
    if not found:
        raise CheckpointError(
            f"{where} holds no {CHECKPOINT_PREFIX}<step> folder with a {CHECKPOINT_FILE}; {understood()}"
        )
    if which == "latest":
        return found[-1]
    scored = []
    for name in found:
        try:
            value = json.loads(metrics_of(name) or "{}").get("score", {}).get("value")
        except ValueError:
            value = None
        if isinstance(value, (int, float)):
            scored.append((value, name))
    if not scored:
        raise CheckpointError(f"no checkpoint of {where} records a score in its {METRICS_FILE}: use its latest")
    return min(scored)[1]


def local_checkpoint_file(path: Path, which: str = "latest") -> Path:
    """The checkpoint.pt of a file, checkpoint folder or run folder (its latest or best checkpoint)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: give a checkpoint.pt, a checkpoint folder or a run folder")
    if (path / CHECKPOINT_FILE).is_file():
        return path / CHECKPOINT_FILE
    complete = [p.name for p in path.iterdir() if (p / CHECKPOINT_FILE).is_file()]

    def metrics_of(name: str) -> str | None:
        file = path / name / METRICS_FILE
        return file.read_text() if file.is_file() else None

    return path / choose_checkpoint(complete, metrics_of, which, str(path)) / CHECKPOINT_FILE


def is_uri(location: str) -> bool:
    return "://" in location or location.startswith(("runs:/", "models:/"))


def read_checkpoint(path: str | Path, which: str = "latest") -> dict:
    """The checked payload of a local checkpoint file, checkpoint folder, run folder (its latest
    or best checkpoint, by `which`), or published weights (a diffusers folder, a DDPM reference
    state dict)."""
    if is_uri(str(path)):
        raise CheckpointError(
            f"{path} is a URI: the core reads local files; read it with diffusion.platform.checkpoint_uris.read_checkpoint"
        )
    path = Path(path).expanduser()
    from .convert import ConversionError, is_diffusers_folder, payload_from_diffusers

    if path.is_dir() and not (path / CHECKPOINT_FILE).exists() and is_diffusers_folder(path):
        try:
            return payload_from_diffusers(path)
        except ConversionError as e:
            raise CheckpointError(str(e)) from None
    path = local_checkpoint_file(path, which)
    return parse_checkpoint(path.read_bytes(), str(path))


def recipe_of(payload: dict) -> Recipe:
    """The recipe a checkpoint's model was trained with: its `recipe`, or the recipe fields of
    the flat `config` of a checkpoint written before the split (its run settings are left). A
    recipe written before `ema_warmup` existed trained without the warm-up."""
    if "recipe" in payload:
        values = payload["recipe"]
    else:
        values = {k: v for k, v in payload["config"].items() if k in RECIPE_FIELDS}
    return Recipe.from_dict({"ema_warmup": False, **values})


def class_names(payload: dict) -> list[str]:
    """The class names of a checkpoint's class-conditional model, index by index ([] for an
    unconditional one; the indices as names where the checkpoint has none, as imported weights)."""
    count = unet_config_of(payload).num_classes
    names = [str(name) for name in payload.get("classes") or range(count)]
    if len(names) != count:
        raise ValueError(f"{len(names)} class names for a UNet of {count} classes")
    return names


def unet_config_of(payload: dict) -> UNetConfig:
    """The UNetConfig a checkpoint's weights belong to."""
    if "unet" in payload:
        return UNetConfig(**payload["unet"])
    recipe = recipe_of(payload)
    return replace(UNET_CONFIGS[recipe.model], dropout=recipe.dropout, downsample_padding=LEGACY_DOWNSAMPLE_PADDING)


def sampling_defaults(payload: dict) -> dict:
    """How the checkpoint's model is sampled unless told otherwise: DDPM's variance and clipping."""
    return {**SAMPLING_DEFAULTS, **payload.get("sampling", {})}


def model_from(payload: dict, ema: bool = True) -> UNet:
    """The UNet of a checkpoint payload with its EMA (or raw) weights, in eval mode on the CPU."""
    model = UNet(unet_config_of(payload))
    model.load_state_dict(payload["ema" if ema else "model"])
    return model.eval()


def betas_from(payload: dict) -> Tensor:
    """The beta schedule the checkpoint's model was trained with (float64, length T)."""
    return torch.as_tensor(payload["betas"], dtype=torch.float64)


def load_checkpoint(path: str | Path, which: str = "latest") -> tuple[UNet, UNet, Recipe]:
    """(model, EMA model, recipe) from a local checkpoint (see `read_checkpoint`); both models
    in eval mode on the CPU."""
    payload = read_checkpoint(path, which)
    return model_from(payload, ema=False), model_from(payload, ema=True), recipe_of(payload)
