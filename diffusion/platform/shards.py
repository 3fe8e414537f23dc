"""Parquet shards + manifest.json: the on-storage form of a prepared data set.

Each shard holds rows of (image: uint8 H x W x C as Arrow's fixed-shape tensor, label,
index, split). `manifest.json` lists every shard with its row count, byte size and
sha256, and is written LAST: a folder without a manifest is never a complete data set.
Shard names carry their checksum, so a re-run never overwrites a file an older manifest
points to; the old manifest is removed before anything else changes. A writer first leaves a
claim in the folder (`Claim`): of two runs writing into one folder at once, one stops with an
error instead of both reporting success. A manifest names its shards by file name only, in its
own folder: a path that leads elsewhere is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from ..errors import excerpt
from .progress import progress
from .sources import DataError, Source
from .storage import Location, open_location

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_BYTES = 32 * 2**20  # images per shard: as many as fit in about 32 MiB
SHARD_NAME = re.compile(r"shard-\d{5}-[0-9a-f]{16}\.parquet")
CLAIM_PREFIX = ".claim-"
MANIFEST_KEYS = ("count", "height", "width", "channels", "splits", "classes", "shards")


def _table(images: np.ndarray, labels: np.ndarray, index: np.ndarray, splits: list[str]) -> pa.Table:
    return pa.table(
        {
            "image": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(images)),
            "label": pa.array(labels, type=pa.int64()),
            "index": pa.array(index, type=pa.int64()),
            "split": pa.array(splits, type=pa.string()),
        }
    )


class Claim:
    """One writer's claim on a data set's folder: a `.claim-<time>-<random>` file written before
    anything else. Claims sort by their time, and only the oldest may write: a later writer
    stops with a DataError naming the claim that holds the folder (checked again right before
    the manifest is written, so two writers can never both finish)."""

    def __init__(self, location: Location):
        self.location = location
        self.name = f"{CLAIM_PREFIX}{time.time_ns():020d}-{secrets.token_hex(4)}"

    def __enter__(self) -> "Claim":
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.location.fs.create_dir(self.location.path, recursive=True)
        self.location.write_bytes(self.name, json.dumps(mine).encode())
        return self

    def __exit__(self, *exc) -> None:
        self.location.delete(self.name)

    def check(self) -> None:
        claims = sorted(name for name in _names(self.location) if name.startswith(CLAIM_PREFIX))
        if claims and claims[0] != self.name:
            try:
                holder = json.loads(self.location.read_bytes(claims[0]))
            except (OSError, ValueError):
                holder = {}
            who = ", ".join(f"{k} {v}" for k, v in holder.items())
            raise DataError(
                f"another run is writing a data set to {self.location.uri} ({claims[0]}: {who}): wait for it to "
                f"finish, or, if it died, delete {self.location.join(claims[0])} and run again"
            )


def _names(location: Location) -> list[str]:
    return [info.base_name for info in location.fs.get_file_info(_selector(location))]


def write_shards(source: Source, location: Location, shard_bytes: int = SHARD_BYTES, quiet: bool = False) -> dict:
    """Write `source` as shards + manifest at `location`; returns the manifest.

    Idempotent: when a valid manifest for the same input and options is already there, it is
    returned untouched."""
    with Claim(location) as claim:
        claim.check()
        return _write_shards(source, location, shard_bytes, quiet, claim)


def _write_shards(source: Source, location: Location, shard_bytes: int, quiet: bool, claim: Claim) -> dict:
    fingerprint = {"dataset": source.dataset, "splits": source.splits, "shard_bytes": shard_bytes, **source.fingerprint}
    if location.exists(MANIFEST):
        try:
            existing = read_manifest(location, verify="size")
        except DataError:
            existing = None
        if existing and existing.get("fingerprint") == fingerprint:
            _say(quiet, f"{location.uri} already holds this data set ({existing['count']} images); nothing to do")
            return existing
    location.delete(MANIFEST)  # from here on, the old shard set is no longer complete

    shards, pending, shape, count, start = [], [], None, 0, time.time()
    rows_per_shard = None

    def flush(rows):
        images = np.concatenate([r[1] for r in rows])
        labels = np.concatenate([r[2] for r in rows])
        splits = [r[0] for r in rows for _ in range(len(r[1]))]
        index = np.arange(count - len(images), count)
        sink = pa.BufferOutputStream()
        pq.write_table(_table(images, labels, index, splits), sink, compression="none")
        data = sink.getvalue().to_pybytes()
        sha = hashlib.sha256(data).hexdigest()
        name = f"shard-{len(shards):05d}-{sha[:16]}.parquet"
        location.write_bytes(name, data)
        shards.append({"path": name, "rows": len(images), "bytes": len(data), "sha256": sha})

    buffered = 0
    bar = progress(source.count, f"preparing {source.dataset}", unit="img", disable=quiet)
    for split, images, labels in source.chunks:
        bar.update(len(images))
        if shape is None:
            shape = tuple(images.shape[1:])
            rows_per_shard = max(1, shard_bytes // int(np.prod(shape)))
        elif tuple(images.shape[1:]) != shape:
            raise DataError(f"image shape {images.shape[1:]} differs from the first images' {shape}")
        while len(images):
            take = min(len(images), rows_per_shard - buffered)
            pending.append((split, images[:take], labels[:take]))
            images, labels = images[take:], labels[take:]
            buffered += take
            count += take
            if buffered == rows_per_shard:
                flush(pending)
                pending, buffered = [], 0
    if pending:
        flush(pending)
    bar.close()
    if count == 0:
        raise DataError(f"{source.dataset} {source.splits} holds no images: nothing was written")

    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": source.dataset,
        "splits": source.splits,
        "count": count,
        "height": shape[0],
        "width": shape[1],
        "channels": shape[2],
        "classes": source.classes,
        "columns": {
            "image": "uint8 HWC fixed-shape tensor",
            "label": "int64 (-1: none)",
            "index": "int64",
            "split": "string",
        },
        "fingerprint": fingerprint,
        "shards": shards,
    }
    claim.check()  # still the one writer: only now may the manifest make the set complete
    location.write_bytes(MANIFEST, json.dumps(manifest, indent=2).encode())
    keep = {s["path"] for s in shards} | {MANIFEST}
    for info in location.fs.get_file_info(_selector(location)):
        name = info.path.rsplit("/", 1)[-1]
        if name.startswith("shard-") and name.endswith(".parquet") and name not in keep:
            location.fs.delete_file(info.path)  # shards of an older data set at the same URI
    _say(quiet, f"wrote {count} images in {len(shards)} shards to {location.uri} ({time.time() - start:.1f} s)")
    return manifest


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, flush=True)


def _selector(location: Location):
    import pyarrow.fs as pafs

    return pafs.FileSelector(location.path, allow_not_found=True)


def read_manifest(location: Location, verify: str = "full") -> dict:
    """The manifest at `location`, checked: "size" compares every shard's byte size, "full"
    also its sha256 (reads every byte), "none" checks nothing beyond the manifest itself."""
    if verify not in ("full", "size", "none"):
        raise ValueError(f"verify must be 'full', 'size' or 'none', got {verify!r}")
    if not location.exists(MANIFEST):
        raise DataError(
            f"no {MANIFEST} at {location.uri}: it is not a prepared data set (or its preparation did not finish). "
            f"Prepare it with: python jobs/prepare_data.py --dataset cifar10|stl10|digits|imagefolder --out {location.uri}"
        )
    where = f"{location.uri.rstrip('/')}/{MANIFEST}"
    again = f"prepare the data set again (python jobs/prepare_data.py ... --out {location.uri})"
    try:
        manifest = json.loads(location.read_bytes(MANIFEST))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{where} is not valid JSON ({e}): it was cut short or edited; {again}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{where} holds a JSON {type(manifest).__name__}, not a manifest object; {again}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{where} has format version {manifest.get('format_version')}, this code reads {FORMAT_VERSION}; {again}"
        )
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    shards = manifest.get("shards")
    if missing or not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise DataError(f"{where} lacks {missing or ['a list of shards']}; {again}")
    for shard in shards:
        if not SHARD_NAME.fullmatch(str(shard.get("path", ""))) or not {"rows", "bytes", "sha256"} <= set(shard):
            raise DataError(
                f"{where} names a shard {excerpt(shard.get('path'))} that is not a shard file of its own folder "
                f"(shard-NNNNN-<sha256>.parquet with rows, bytes and sha256): refused; {again}"
            )
    if verify == "none":
        return manifest
    for shard in manifest["shards"]:
        size = location.size(shard["path"])
        if size is None:
            raise DataError(f"{location.uri} is missing shard {shard['path']}: prepare the data set again")
        if size != shard["bytes"] or (verify == "full" and _sha256(location, shard["path"]) != shard["sha256"]):
            raise DataError(
                f"shard {shard['path']} at {location.uri} does not match its checksum in {MANIFEST} "
                "(changed or corrupted): prepare the data set again"
            )
    return manifest


def _sha256(location: Location, name: str) -> str:
    return hashlib.sha256(location.read_bytes(name)).hexdigest()


@dataclass
class ShardSet:
    """A prepared data set: its verified manifest and where its shards are."""

    location: Location
    manifest: dict

    @classmethod
    def open(cls, uri: str, endpoint_url: str | None = None, verify: str = "full") -> "ShardSet":
        location = open_location(uri, endpoint_url)
        return cls(location, read_manifest(location, verify))

    def __len__(self) -> int:
        return self.manifest["count"]

    def count(self, splits: list[str]) -> int:
        """The number of images of `splits` (only the shards' split column is read)."""
        self._check_splits(splits)
        total = 0
        for path in self.shard_paths:
            table = pq.read_table(path, columns=["split"], filesystem=self.location.fs)
            total += len(table.filter(pa.compute.is_in(table["split"], pa.array(splits))))
        return total

    def first_images(self, n: int) -> np.ndarray:
        """The first `n` images of the data set, uint8 (n, H, W, C) (e.g. a figure's real images)."""
        return next(self.iter_batches(n))["image"]

    @property
    def digest(self) -> str:
        """The sha256 of the manifest, which names every shard by its sha256: the data set's identity."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    @property
    def shard_paths(self) -> list[str]:
        return [self.location.join(s["path"]) for s in self.manifest["shards"]]

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        splits: list[str] | None = None,
    ) -> Iterator[dict]:
        """Batches {"image": uint8 (B, H, W, C), "label": int64 (B,), "index": int64 (B,)} as
        numpy arrays, without Ray; each shard's bytes are checked against its sha256 as read.
        With `shuffle`, shard order and rows within a shard are permuted (seeded); `splits`
        keeps only rows of those splits."""
        self._check_splits(splits)
        rng = np.random.default_rng(seed)
        shards = list(self.manifest["shards"])
        if shuffle:
            rng.shuffle(shards)
        carry = None
        for shard in shards:
            data = self.location.read_bytes(shard["path"])
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise DataError(
                    f"shard {shard['path']} at {self.location.uri} does not match its checksum: prepare again"
                )
            table = pq.read_table(pa.BufferReader(data), columns=["image", "label", "index", "split"])
            if splits is not None:
                table = table.filter(pa.compute.is_in(table.column("split"), pa.array(splits)))
            batch = {
                "image": self._images(table.column("image")),
                "label": table.column("label").to_numpy(),
                "index": table.column("index").to_numpy(),
            }
            if shuffle:
                order = rng.permutation(len(batch["label"]))
                batch = {k: v[order] for k, v in batch.items()}
            if carry is not None:
                batch = {k: np.concatenate([carry[k], v]) for k, v in batch.items()}
            n = len(batch["label"])
            full = n - n % batch_size
            for start in range(0, full, batch_size):
                yield {k: v[start : start + batch_size] for k, v in batch.items()}
            carry = {k: v[full:] for k, v in batch.items()} if full < n else None
        if carry is not None and not drop_last:
            yield carry

    def ray_dataset(self, splits: list[str] | None = None, columns: list[str] | None = None):
        """A ray.data.Dataset streaming exactly the manifest's shards (never a folder listing),
        with only the rows of `splits` and the `columns` given (Ray pushes both into the read)."""
        import ray.data
        from ray.data.expressions import col

        self._check_splits(splits)
        ds = ray.data.read_parquet(self.shard_paths, filesystem=self.location.fs)
        if splits is not None:
            ds = ds.filter(expr=col("split").is_in(list(splits)))
        return ds if columns is None else ds.select_columns(columns)

    def _images(self, column: pa.ChunkedArray) -> np.ndarray:
        """uint8 (N, H, W, C) from the image column, chunk by chunk (pyarrow cannot combine
        the chunks of a fixed-shape tensor column)."""
        m = self.manifest
        parts = [chunk.to_numpy_ndarray() for chunk in column.chunks if len(chunk)]
        return np.concatenate(parts) if parts else np.empty((0, m["height"], m["width"], m["channels"]), np.uint8)

    def _check_splits(self, splits: list[str] | None) -> None:
        unknown = sorted(set(splits or []) - set(self.manifest["splits"]))
        if unknown:
            raise DataError(f"{self.location.uri} has no split(s) {unknown}; it has {self.manifest['splits']}")
