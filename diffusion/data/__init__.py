"""Data sets as Parquet shards in object storage: archives/folders -> shards -> Ray Data.

storage.py  URIs (local path or s3://bucket/prefix) -> pyarrow filesystems
sources.py  readers of the official CIFAR-10 / STL-10 archives and of image folders
shards.py   shards + manifest.json (written last); ShardSet: verified reading, plain
            iterator without Ray, and a ray.data.Dataset
"""

from ..images import to_model_input
from .shards import MANIFEST, ShardSet, read_manifest, write_shards
from .sources import CIFAR10, STL10, DataError, Source, cifar10_source, imagefolder_source, stl10_source
from .storage import Location, StorageError, open_location

__all__ = [
    "CIFAR10",
    "MANIFEST",
    "STL10",
    "DataError",
    "Location",
    "ShardSet",
    "Source",
    "StorageError",
    "cifar10_source",
    "imagefolder_source",
    "open_location",
    "read_manifest",
    "stl10_source",
    "to_model_input",
    "write_shards",
]
