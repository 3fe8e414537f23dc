"""What a training run's folder (<storage>/<name>) holds beside Ray Train's checkpoints: `run.json`,
the record of the run's MLflow run and of what the run trains (data set, network, noise schedule).

A start whose folder holds a checkpoint resumes that run: it continues the recorded MLflow run,
and it is refused, in one line naming what differs, with another data set or a recipe whose
network or noise schedule differs (a larger --max-steps extends a run; the optimisation's and
the run's other options may change). Any other start is a new run, with a new MLflow run.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass

from ..checkpoint import CHECKPOINT_FILE, CHECKPOINT_PREFIX, parse_checkpoint, recipe_of, unet_config_of
from ..config import Recipe
from ..errors import OptionError
from .storage import Location

RECORD_FILE = "run.json"
SCHEDULE_FIELDS = ("schedule", "num_timesteps", "beta_start", "beta_end")
NOT_SHAPE = ("dropout",)  # a UNetConfig field that a resume may change


def checkpoint_names(folder: Location) -> list[str]:
    """The complete checkpoint-<step> folders (those with their checkpoint.pt) of a run folder."""
    from pyarrow import fs as pafs

    if folder.fs.get_file_info(folder.path).type != pafs.FileType.Directory:
        return []
    entries = folder.fs.get_file_info(pafs.FileSelector(folder.path))
    return sorted(
        e.base_name
        for e in entries
        if e.base_name.startswith(CHECKPOINT_PREFIX) and folder.exists(posixpath.join(e.base_name, CHECKPOINT_FILE))
    )


def as_json(values: dict) -> dict:
    """`values` as JSON holds them (tuples as lists)."""
    return json.loads(json.dumps(values))


@dataclass(frozen=True)
class RunRecord:
    mlflow_run_id: str | None
    data: str  # the data set's URI
    data_sha256: str | None  # its manifest's digest (None: a run checkpointed before records were kept)
    recipe: dict
    unet: dict  # the UNetConfig trained

    @classmethod
    def of_resumed(cls, folder: Location) -> RunRecord | None:
        """The record of the run whose checkpoints `folder` holds, None where it holds none (a new
        run). A run checkpointed before records were kept is read from its latest checkpoint."""
        names = checkpoint_names(folder)
        if not names:
            return None
        if folder.exists(RECORD_FILE):
            return cls(**json.loads(folder.read_bytes(RECORD_FILE)))
        path = posixpath.join(names[-1], CHECKPOINT_FILE)
        payload = parse_checkpoint(folder.read_bytes(path), f"{folder.uri}/{path}")
        unet = unet_config_of(payload).to_dict()
        return cls(payload.get("mlflow_run_id"), payload["run"]["data"], None, recipe_of(payload).to_dict(), unet)

    def write(self, folder: Location) -> None:
        """Into `folder`, whole or not at all (written aside, then moved)."""
        folder.write_bytes(f"{RECORD_FILE}.tmp", json.dumps(asdict(self), indent=1).encode())
        folder.fs.move(folder.join(f"{RECORD_FILE}.tmp"), folder.join(RECORD_FILE))

    def check_resume(self, recipe: Recipe, unet: dict, data: str, data_sha256: str, where: str) -> None:
        """An OptionError naming what differs unless a start with this recipe, UNet and data set may
        resume this run (whose folder is `where`)."""
        fix = f"give another --name or --storage for a new run, or {where}'s own to resume it"
        recorded, there, asked = Recipe.from_dict(self.recipe), as_json(self.unet), as_json(unet)
        same_data = data_sha256 == self.data_sha256 if self.data_sha256 else data == self.data
        if not same_data:
            shape = [(u["image_size"], u["in_channels"]) for u in (there, asked)]
            sizes = f" of {shape[1][0]}x{shape[1][0]}x{shape[1][1]} images, the run's {shape[0][0]}x{shape[0][0]}x{shape[0][1]}"
            raise OptionError(
                f"{where} trains on another data set ({self.data}), not {data}"
                + (sizes + f" (jobs/prepare_data.py --size {shape[0][0]})" if shape[0] != shape[1] else "")
                + f": {fix}"
            )
        differ = [
            f"{name} {there[name]} there, {asked.get(name)} asked"
            for name in there
            if name not in NOT_SHAPE and there[name] != asked.get(name)
        ] + [
            f"{name} {getattr(recorded, name)!r} there, {getattr(recipe, name)!r} asked"
            for name in SCHEDULE_FIELDS
            if getattr(recorded, name) != getattr(recipe, name)
        ]
        if differ:
            raise OptionError(f"{where} trains another network or noise schedule ({'; '.join(differ)}): {fix}")
