"""Readers of the official CIFAR-10 and STL-10 archives and of image folders.

Each reader yields (split, images, labels) chunks: images uint8 (N, H, W, C), labels int64
(-1 where a split has none, as STL-10's unlabeled). Official archives are checked against
their md5 before a byte is read; downloads resume and show progress.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..digest import file_digest
from ..errors import InputError
from .progress import progress


class DataError(InputError, ValueError):
    """Input data that cannot be prepared or read; the message names the problem and the fix."""


Chunk = tuple[str, np.ndarray, np.ndarray]  # (split, uint8 images (N, H, W, C), int64 labels (N,))


@dataclass
class Source:
    """A data set ready to be sharded: its classes and an iterator of chunks."""

    dataset: str
    splits: list[str]
    classes: list[str]
    chunks: Iterator[Chunk]
    fingerprint: dict = field(default_factory=dict)  # what identifies the input, for idempotent re-runs
    count: int | None = None  # images, when known before reading them (progress)


@dataclass(frozen=True)
class Archive:
    filename: str
    url: str
    md5: str


CIFAR10 = Archive(
    "cifar-10-python.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
)
STL10 = Archive(
    "stl10_binary.tar.gz",
    "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
    "91f7769df0f17e558f3565bffb0c7dfb",
)
CIFAR10_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
STL10_SPLITS = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}
DIGITS_SPLITS = ("train", "test")
MODE_NAMES = {
    "L": "grey",
    "LA": "grey with alpha",
    "RGBA": "RGBA",
    "P": "palette",
    "CMYK": "CMYK",
    "1": "black and white",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CHUNK = 1000


# ---------------------------------------------------------------------------- archives


def download(url: str, dest: Path, md5: str | None) -> Path:
    """Download `url` to `dest`, resuming a partial `dest.part`, with a progress bar on stderr.
    The file appears at `dest` only once complete and (when md5 is given) verified."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is already whole
            response = None
        else:
            raise DataError(
                f"download of {url} failed: HTTP {e.code}. Pass --source with a local copy instead."
            ) from None
    except OSError as e:
        raise DataError(
            f"cannot download {url}: {e}. Pass --source with a local copy of {dest.name} instead."
        ) from None
    if response is not None:
        with response:
            if have and response.status != 206:  # the server ignored the range: start over
                have = 0
            total = have + int(response.headers.get("Content-Length") or 0)
            bar = progress(total or None, f"downloading {dest.name}", unit="B", unit_scale=True, initial=have)
            with open(part, "ab" if have else "wb") as f, bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
    try:
        check_md5(part, md5, url)
    except DataError:
        part.unlink()  # never resume from a bad file
        raise
    os.replace(part, dest)
    return dest


def check_md5(path: Path, md5: str | None, origin: str) -> None:
    if md5 is None:
        return
    got = file_digest(path, "md5")
    if got != md5:
        raise DataError(
            f"{origin}: md5 {got} does not match the expected {md5}; the archive is truncated or not the "
            "official file. Download it again or pass the right file with --source (--md5 for a re-packed copy)."
        )


def resolve_archive(archive: Archive, source: str | None, cache_dir: Path, md5: str | None) -> Path:
    """The verified archive: a local file, a folder holding it, a URL, or (no source) the
    official URL, downloaded into cache_dir."""
    if source is None or source.startswith(("http://", "https://")):
        url = source or archive.url
        dest = cache_dir / archive.filename
        return dest if dest.exists() and _md5_ok(dest, md5) else download(url, dest, md5)
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / archive.filename
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: pass --source as the {archive.filename} file, a folder holding it, "
            f"or a URL (default: download from {archive.url})"
        )
    check_md5(path, md5, str(path))
    return path


def _md5_ok(path: Path, md5: str | None) -> bool:
    return md5 is None or file_digest(path, "md5") == md5


def _tar_members(path: Path) -> dict[str, tarfile.TarInfo]:
    return {PurePosixPath(m.name).name: m for m in tarfile.open(path).getmembers() if m.isfile()}


def _read_member(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, archive: Path
) -> io.BufferedReader:
    if name not in members:
        raise DataError(f"{archive} has no {name}: it is not the official archive layout")
    return tar.extractfile(members[name])


def cifar10_source(archive: Path, splits: list[str]) -> Source:
    """The python version of CIFAR-10: pickled batches of 10,000 rows of 3,072 bytes (R, G, B planes of 32x32)."""
    members = _tar_members(archive)
    with tarfile.open(archive) as tar:
        meta = pickle.load(_read_member(tar, members, "batches.meta", archive), encoding="bytes")
    classes = [name.decode() for name in meta[b"label_names"]]

    def chunks() -> Iterator[Chunk]:
        with tarfile.open(archive) as tar:
            for split in splits:
                for batch in CIFAR10_SPLITS[split]:
                    d = pickle.load(_read_member(tar, members, batch, archive), encoding="bytes")
                    images = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                    yield split, np.ascontiguousarray(images), np.asarray(d[b"labels"], dtype=np.int64)

    return Source("cifar10", splits, classes, chunks(), count=10_000 * sum(len(CIFAR10_SPLITS[s]) for s in splits))


def stl10_source(archive: Path, splits: list[str]) -> Source:
    """STL-10's binaries: N x 3 x 96 x 96 uint8, each 96x96 plane stored column-major; labels 1..10."""
    members = _tar_members(archive)
    with tarfile.open(archive) as tar:
        classes = _read_member(tar, members, "class_names.txt", archive).read().decode().split()
    image_bytes = 3 * 96 * 96

    def chunks() -> Iterator[Chunk]:
        with tarfile.open(archive) as tar:
            for split in splits:
                x_name, y_name = STL10_SPLITS[split]
                x_file = _read_member(tar, members, x_name, archive)
                n = members[x_name].size // image_bytes
                labels = np.full(n, -1, dtype=np.int64)
                if y_name:
                    labels = (
                        np.frombuffer(_read_member(tar, members, y_name, archive).read(), dtype=np.uint8).astype(
                            np.int64
                        )
                        - 1
                    )
                    if len(labels) != n:
                        raise DataError(f"{archive}: {x_name} holds {n} images but {y_name} {len(labels)} labels")
                for start in range(0, n, CHUNK):
                    count = min(CHUNK, n - start)
                    raw = np.frombuffer(x_file.read(count * image_bytes), dtype=np.uint8).reshape(count, 3, 96, 96)
                    yield split, np.ascontiguousarray(raw.transpose(0, 3, 2, 1)), labels[start : start + count]

    count = sum(members[STL10_SPLITS[s][0]].size // image_bytes for s in splits)
    return Source("stl10", splits, classes, chunks(), count=count)


def digits_source(splits: list[str]) -> Source:
    """scikit-learn's 1,797 handwritten digits (UCI, inside the package: no download) at their
    own 8x8, one grey channel, ink bright on black: 17 levels 0..16 scaled to 0..255 (v * 255 / 16,
    rounded). A fixed split: 1,437 train and 360 test images, stratified by class (seed 0)."""
    from sklearn import __version__ as sklearn_version
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=360, random_state=0, stratify=labels)
    parts = {"train": np.sort(train), "test": np.sort(test)}

    def chunks() -> Iterator[Chunk]:
        for split in splits:
            yield split, images[parts[split]], labels[parts[split]]

    classes = [str(d) for d in range(10)]
    fingerprint = {"sklearn": sklearn_version, "pixels_sha256": hashlib.sha256(images.tobytes()).hexdigest()}
    return Source("digits", splits, classes, chunks(), fingerprint, count=sum(len(parts[s]) for s in splits))


# ---------------------------------------------------------------------------- image folders


def _images_and_others(files: list[str]) -> tuple[list[str], list[str]]:
    is_image = [PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES for n in files]
    return [n for n, i in zip(files, is_image) if i], [n for n, i in zip(files, is_image) if not i]


def _list_folder(root: Path) -> tuple[list[str], list[str], callable]:
    """Relative POSIX paths of the images under a folder or in a tar/tar.gz, of its other files
    (skipped), and a function that yields (relative path, bytes) in a deterministic order."""
    if root.is_dir():
        names, others = _images_and_others(
            sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        )

        def read_all(wanted: set[str]):
            for name in names:
                if name in wanted:
                    yield name, (root / name).read_bytes()

        return names, others, read_all
    if root.is_file() and tarfile.is_tarfile(root):
        with tarfile.open(root, "r|*") as tar:
            names, others = _images_and_others([m.name.lstrip("./") for m in tar if m.isfile()])

        def read_all(wanted: set[str]):
            with tarfile.open(root, "r|*") as tar:  # one streaming pass, in archive order
                for m in tar:
                    name = m.name.lstrip("./")
                    if m.isfile() and name in wanted:
                        yield name, tar.extractfile(m).read()

        return names, others, read_all
    raise DataError(f"{root} is neither a folder nor a tar/tar.gz archive of class sub-folders")


def imagefolder_source(root: Path, splits: list[str] | None, size: int | None) -> Source:
    """A folder (or tar/tar.gz) of <class>/<image> or <split>/<class>/<image> JPEG/PNG files.

    Labels index the sorted class names (torchvision's ImageFolder convention). Images are
    converted to RGB; with `size` they are resized (shorter side, bicubic) and center-cropped
    to size x size, otherwise every image must already have the same size."""
    from PIL import Image

    if not root.exists():
        raise DataError(f"{root} does not exist: pass --source as a folder or tar/tar.gz of class sub-folders")
    names, others, read_all = _list_folder(root)
    if others:
        print(f"skipped {len(others)} file(s) that are not images ({', '.join(IMAGE_SUFFIXES)}): {others[0]}, ...")
    if not names:
        raise DataError(
            f"no JPEG/PNG images under {root}: expected class sub-folders, <class>/<image>.jpg "
            "or <split>/<class>/<image>.jpg"
        )
    depths = {len(PurePosixPath(n).parts) for n in names}
    if depths not in ({2}, {3}):
        raise DataError(
            f"{root} mixes layouts (images at depths {sorted(depths)}): use <class>/<image> or <split>/<class>/<image>"
        )
    layout_has_splits = depths == {3}
    found = sorted({PurePosixPath(n).parts[0] for n in names}) if layout_has_splits else ["train"]
    splits = splits or found
    unknown = [s for s in splits if s not in found]
    if unknown:
        raise DataError(f"split(s) {unknown} not found in {root}; it has {found}")

    def split_class(name: str) -> tuple[str, str]:
        parts = PurePosixPath(name).parts
        return (parts[0], parts[1]) if layout_has_splits else ("train", parts[0])

    selected = [n for n in names if split_class(n)[0] in splits]
    classes = sorted({split_class(n)[1] for n in selected})
    class_index = {c: i for i, c in enumerate(classes)}

    def chunks() -> Iterator[Chunk]:
        buffer: dict[str, tuple[list, list]] = {}
        reference, converted = None, Counter()
        for name, data in read_all(set(selected)):
            image, mode = _decode(Image, root, name, data, size)
            converted[mode] += mode != "RGB"
            if reference is None:
                reference = (name, image.shape)
            elif image.shape != reference[1]:
                raise DataError(
                    f"images of different sizes: {name} is {image.shape[1]}x{image.shape[0]} but {reference[0]} is "
                    f"{reference[1][1]}x{reference[1][0]}; pass --size N to resize and center-crop to N x N"
                )
            split, cls = split_class(name)
            images, labels = buffer.setdefault(split, ([], []))
            images.append(image)
            labels.append(class_index[cls])
            if len(images) == CHUNK:
                yield split, np.stack(images), np.asarray(labels, dtype=np.int64)
                buffer[split] = ([], [])
        for split, (images, labels) in buffer.items():
            if images:
                yield split, np.stack(images), np.asarray(labels, dtype=np.int64)
        if converted.total():
            modes = ", ".join(f"{n} {MODE_NAMES.get(m, m)} ({m})" for m, n in converted.items() if n)
            print(f"converted to RGB: {modes}")

    fingerprint = {"source": str(root.resolve()), **_tree_stat(root), "size": size}
    return Source("imagefolder", splits, classes, chunks(), fingerprint, count=len(selected))


def _decode(Image, root: Path, name: str, data: bytes, size: int | None) -> tuple[np.ndarray, str]:
    """An image file's pixels as RGB uint8 (H, W, 3), resized and cropped to `size`, and its own mode."""
    try:
        image = Image.open(io.BytesIO(data))
        mode = image.mode
        image = image.convert("RGB")
    except Exception as e:  # PIL raises several types for broken files
        raise DataError(f"cannot decode {root}/{name}: {e}; remove or replace that file") from None
    if size:
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8), mode


def _tree_stat(root: Path) -> dict:
    """Byte count and newest modification time: changes when files are added, removed or edited."""
    stats = [root.stat()] if root.is_file() else [p.stat() for p in root.rglob("*") if p.is_file()]
    return {"bytes": sum(s.st_size for s in stats), "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}
