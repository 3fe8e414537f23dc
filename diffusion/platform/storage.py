"""Storage URIs -> pyarrow filesystems: a local path (the default) or s3://bucket/prefix on
any S3-compatible store.

The S3 endpoint comes from `endpoint_url` or AWS_ENDPOINT_URL (none: AWS itself);
credentials only from the environment or the usual AWS config files, resolved by boto3's
standard chain and never printed.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from ..errors import InputError


class StorageError(InputError, RuntimeError):
    """Storage that cannot be used as given; the message names the problem and the fix."""


@dataclass(frozen=True)
class Location:
    """A folder in a filesystem: `fs` and the path inside it (no scheme; bucket/prefix on S3)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.join(name)) as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write file `name` (a path under this folder: its folders are made on a local disk)."""
        path = self.join(name)
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.join(name)).type != pafs.FileType.NotFound

    def size(self, name: str) -> int | None:
        info = self.fs.get_file_info(self.join(name))
        return None if info.type == pafs.FileType.NotFound else info.size

    def delete(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_file(self.join(name))


def _s3_filesystem(endpoint_url: str | None) -> pafs.S3FileSystem:
    import boto3  # the standard AWS credential chain: environment, config files, profiles

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    session = boto3.Session()
    credentials = session.get_credentials()
    if credentials is None:
        raise StorageError(
            "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE / ~/.aws/credentials) in the environment"
        )
    frozen = credentials.get_frozen_credentials()
    options = dict(
        access_key=frozen.access_key,
        secret_key=frozen.secret_key,
        session_token=frozen.token,
        region=session.region_name or "us-east-1",
        connect_timeout=5,
        request_timeout=60,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"bad S3 endpoint {endpoint_url!r}: give it as http(s)://host:port")
        options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pafs.S3FileSystem(**options)


def open_location(uri: str, endpoint_url: str | None = None, check: bool = True) -> Location:
    """The Location of `uri`: a local path or s3://bucket/prefix. With `check`, an S3 URI's
    endpoint and bucket are probed once, so a wrong endpoint or bucket fails here, clearly."""
    parsed = urlparse(str(uri))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"bad S3 URI {uri!r}: give it as s3://bucket/prefix")
        fs = _s3_filesystem(endpoint_url)
        location = Location(fs, f"{parsed.netloc}{parsed.path}".rstrip("/"), str(uri))
        if check:
            _probe_bucket(fs, parsed.netloc, endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "AWS")
        return location
    if parsed.scheme not in ("", "file"):
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    path = os.path.abspath(os.path.expanduser(parsed.path if parsed.scheme == "file" else str(uri)))
    return Location(pafs.LocalFileSystem(), path, str(uri))


def _probe_bucket(fs: pafs.S3FileSystem, bucket: str, endpoint: str) -> None:
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise StorageError(
            f"cannot reach the S3 endpoint {endpoint}: {_first_line(e)}. "
            "Check AWS_ENDPOINT_URL (or --endpoint-url), that the store is running, and the credentials."
        ) from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"S3 bucket {bucket!r} does not exist at {endpoint}: create it first")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
