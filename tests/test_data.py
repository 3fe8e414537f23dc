"""Archives and image folders -> Parquet shards in local folders and S3 -> Ray Data / plain iterator."""

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.digest import file_digest
from diffusion.images import random_flip, to_model_input
from diffusion.platform.shards import MANIFEST, ShardSet
from diffusion.platform.sources import DataError
from diffusion.platform.storage import StorageError, open_location
from helpers import SHARED_CIFAR, free_port, run_main, write_cifar10, write_stl10


def prepare(*args, check=True):
    proc = run_main("jobs/prepare_data.py", *args)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def prepared_cifar10(tmp_path: Path, *extra, per_batch: int = 6, seed: int = 0, out: str | Path | None = None):
    """A synthetic cifar-10-python.tar.gz (`per_batch` images a batch) prepared with `extra` options
    into `out` (default tmp_path/shards): (out, the arrays it must read back as)."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    expected = write_cifar10(archive, per_batch=per_batch, seed=seed)
    out = out or tmp_path / "shards"
    prepare("--dataset", "cifar10", "--source", archive, "--md5", file_digest(archive, "md5"), "--out", out, *extra)
    return out, expected


def rows_by_index(batches):
    out = {}
    for b in batches:
        for image, label, index in zip(b["image"], b["label"], b["index"]):
            out[int(index)] = (np.asarray(image), int(label))
    return out


def assert_round_trip(expected, splits, got):
    images = np.concatenate([expected[s][0] for s in splits])
    labels = np.concatenate([expected[s][1] for s in splits])
    assert len(got) == len(images)
    for i in range(len(images)):
        assert np.array_equal(got[i][0], images[i]) and got[i][1] == labels[i]


def ray_rows(shards: ShardSet):
    batches = shards.ray_dataset(columns=["image", "label", "index"]).iter_torch_batches(
        batch_size=7, dtypes={"image": torch.uint8, "label": torch.int64, "index": torch.int64}
    )
    return rows_by_index({k: v.numpy() for k, v in b.items()} for b in batches)


def test_cifar10_archive_round_trips_pixel_exact_through_ray_data(tmp_path, ray_local):
    out, expected = prepared_cifar10(tmp_path, "--splits", "train", "test")
    shards = ShardSet.open(str(out))
    m = shards.manifest
    assert (m["count"], m["height"], m["width"], m["channels"]) == (36, 32, 32, 3)
    assert m["splits"] == ["train", "test"] and m["classes"][0] == "airplane"
    assert_round_trip(expected, ["train", "test"], ray_rows(shards))
    assert_round_trip(expected, ["train", "test"], rows_by_index(shards.iter_batches(5)))


def test_stl10_archive_round_trips_pixel_exact(tmp_path, ray_local):
    archive = tmp_path / "stl10_binary.tar.gz"
    expected = write_stl10(archive)
    out = tmp_path / "stl"
    prepare(
        "--dataset",
        "stl10",
        "--source",
        tmp_path,
        "--md5",
        file_digest(archive, "md5"),
        "--out",
        out,
        "--shard-mb",
        0.1,
    )
    shards = ShardSet.open(str(out))
    assert shards.manifest["count"] == 16 and len(shards.manifest["shards"]) == 6  # 0.1 MiB = 3 images a shard
    assert (shards.manifest["height"], shards.manifest["width"]) == (96, 96)
    assert_round_trip(expected, ["train", "test", "unlabeled"], ray_rows(shards))
    got = rows_by_index(shards.iter_batches(4))
    assert [got[i][1] for i in range(9, 16)] == [-1] * 7  # unlabeled


def test_cifar10_to_s3_and_back_over_http(tmp_path, s3, ray_local):
    uri = f"s3://{s3}/sets/cifar10"
    _, expected = prepared_cifar10(tmp_path, per_batch=4, out=uri)
    shards = ShardSet.open(uri)
    assert shards.location.fs.type_name == "s3"
    assert_round_trip(expected, ["train"], ray_rows(shards))  # Ray Data reads over HTTP
    assert_round_trip(expected, ["train"], rows_by_index(shards.iter_batches(3)))  # pyarrow reads over HTTP


@pytest.mark.slow
def test_shared_cifar10_jpegs_as_an_image_folder_to_local_and_s3(tmp_path, s3, ray_local):
    if not SHARED_CIFAR.exists():
        pytest.skip(f"real-data check skipped: {SHARED_CIFAR} is absent")
    local, remote = tmp_path / "cifar-jpeg", f"s3://{s3}/cifar-jpeg"  # the 10,000 test images: every class
    prepare("--dataset", "imagefolder", "--source", SHARED_CIFAR, "--splits", "test", "--out", local)
    prepare("--dataset", "imagefolder", "--source", SHARED_CIFAR, "--splits", "test", "--out", remote)
    shards = ShardSet.open(str(local))
    assert shards.manifest["count"] == 10000 and shards.manifest["splits"] == ["test"]
    assert len(shards.manifest["classes"]) == 10
    labels = np.concatenate([b["label"] for b in shards.iter_batches(4096)])
    assert Counter(labels.tolist()) == {c: 1000 for c in range(10)}
    remote_set = ShardSet.open(remote)
    counts = remote_set.ray_dataset(columns=["label"]).groupby("label").count().to_pandas()
    assert dict(zip(counts["label"], counts["count()"])) == {c: 1000 for c in range(10)}
    assert remote_set.manifest["classes"] == shards.manifest["classes"]


def test_rerun_is_idempotent_and_a_changed_input_replaces_the_set(tmp_path):
    out, _ = prepared_cifar10(tmp_path, per_batch=3)
    archive = tmp_path / "cifar-10-python.tar.gz"
    first = sorted(p.name for p in out.iterdir())
    mtime = (out / MANIFEST).stat().st_mtime_ns
    again = prepare("--dataset", "cifar10", "--source", archive, "--md5", file_digest(archive, "md5"), "--out", out)
    assert "nothing to do" in again.stdout
    assert sorted(p.name for p in out.iterdir()) == first and (out / MANIFEST).stat().st_mtime_ns == mtime
    prepared_cifar10(tmp_path, per_batch=3, seed=1)  # different content at the same URI
    second = sorted(p.name for p in out.iterdir())
    assert second != first and len(second) == len(first)  # old shards are gone, nothing left over
    ShardSet.open(str(out))


def make_folder(root: Path, sizes: dict[str, tuple[int, int]]):
    for name, (w, h) in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w, 3), 100, dtype=np.uint8)).save(path)


def test_imagefolder_resizes_and_center_crops_only_when_asked(tmp_path):
    src = tmp_path / "folder"
    make_folder(src, {"cats/a.png": (40, 30), "dogs/b.jpg": (30, 50), "dogs/c.png": (32, 32)})
    proc = prepare("--dataset", "imagefolder", "--source", src, "--out", tmp_path / "o1", check=False)
    assert proc.returncode == 1 and "images of different sizes" in proc.stderr and "--size N" in proc.stderr
    assert not (tmp_path / "o1" / MANIFEST).exists()
    prepare("--dataset", "imagefolder", "--source", src, "--size", 16, "--out", tmp_path / "o2")
    shards = ShardSet.open(str(tmp_path / "o2"))
    assert (shards.manifest["height"], shards.manifest["width"], shards.manifest["count"]) == (16, 16, 3)
    assert shards.manifest["classes"] == ["cats", "dogs"]
    assert sorted(np.concatenate([b["label"] for b in shards.iter_batches(8)]).tolist()) == [0, 1, 1]


@pytest.mark.parametrize("case", ["md5", "truncated", "empty", "unknown-split", "not-a-folder"])
def test_bad_inputs_are_named_and_publish_nothing(tmp_path, case):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar10(archive, per_batch=2)
    out = tmp_path / "out"
    if case == "md5":  # a re-packed archive checked against the official md5
        args, message = ["--dataset", "cifar10", "--source", archive], "does not match the expected c58f3010"
    elif case == "truncated":
        full_md5 = file_digest(archive, "md5")
        archive.write_bytes(archive.read_bytes()[:-100])
        args, message = (
            ["--dataset", "cifar10", "--source", archive, "--md5", full_md5],
            "truncated or not the official",
        )
    elif case == "empty":
        (tmp_path / "empty" / "cats").mkdir(parents=True)
        args, message = ["--dataset", "imagefolder", "--source", tmp_path / "empty"], "no JPEG/PNG images under"
    elif case == "unknown-split":
        make_folder(tmp_path / "f", {"train/cats/a.png": (8, 8)})
        args, message = (
            ["--dataset", "imagefolder", "--source", tmp_path / "f", "--splits", "val"],
            "split(s) ['val'] not found",
        )
    else:
        args, message = (
            ["--dataset", "cifar10", "--source", tmp_path / "nowhere"],
            "pass --source as the cifar-10-python.tar.gz",
        )
    proc = prepare(*args, "--out", out, check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert not (out / MANIFEST).exists()


def test_unknown_dataset_is_named():
    proc = prepare("--dataset", "imagenet", "--out", "x", check=False)
    assert proc.returncode == 2 and "invalid choice: 'imagenet'" in proc.stderr
    assert all(name in proc.stderr.split("choose from")[1] for name in ("cifar10", "stl10", "imagefolder"))


def test_reading_checks_the_manifest_and_every_shard(tmp_path):
    with pytest.raises(DataError, match="no manifest.json at .*: it is not a prepared data set"):
        ShardSet.open(str(tmp_path))
    out, _ = prepared_cifar10(tmp_path, "--shard-mb", 0.01, per_batch=2)
    manifest = json.loads((out / MANIFEST).read_text())
    first, second = (out / s["path"] for s in manifest["shards"][:2])
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    first.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"shard {first.name} .* does not match its checksum"):
        ShardSet.open(str(out))
    ShardSet.open(str(out), verify="size")  # a size check alone cannot see it...
    with pytest.raises(DataError, match="does not match its checksum"):
        list(ShardSet.open(str(out), verify="size").iter_batches(4))  # ...but the reader does
    second.unlink()
    with pytest.raises(DataError, match=f"missing shard {second.name}: prepare the data set again"):
        ShardSet.open(str(out), verify="size")


def test_unreachable_endpoint_and_missing_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.time()
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {dead}.*AWS_ENDPOINT_URL"):
        open_location("s3://bucket/x", endpoint_url=dead)
    assert time.time() - start < 60
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(StorageError, match="no S3 credentials found: set AWS_ACCESS_KEY_ID"):
        open_location("s3://bucket/x", endpoint_url=dead)


def test_missing_bucket_and_bad_uris(s3):
    with pytest.raises(StorageError, match="S3 bucket 'no-such-bucket' does not exist"):
        open_location("s3://no-such-bucket/x")
    with pytest.raises(StorageError, match="unsupported storage URI 'gs://b/x'"):
        open_location("gs://b/x")


def test_cli_errors_do_not_print_credentials(tmp_path, s3, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    proc = prepare("--dataset", "cifar10", "--source", tmp_path / "missing", "--out", f"s3://{s3}/x", check=False)
    assert proc.returncode == 1 and "very-secret-value" not in proc.stdout + proc.stderr


def test_plain_iterator_shuffles_deterministically_and_covers_every_row(tmp_path):
    out, _ = prepared_cifar10(tmp_path, "--shard-mb", 0.02, per_batch=5)
    shards = ShardSet.open(str(out))
    order = lambda seed: np.concatenate([b["index"] for b in shards.iter_batches(4, shuffle=True, seed=seed)])  # noqa: E731
    assert sorted(order(0).tolist()) == list(range(25))
    assert np.array_equal(order(0), order(0)) and not np.array_equal(order(0), order(1))
    sizes = [len(b["index"]) for b in shards.iter_batches(4, drop_last=True)]
    assert sizes == [4] * 6


def test_to_model_input_scales_and_flips():
    images = torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8)
    x = to_model_input(images)
    assert x.shape == (64, 3, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x, images.permute(0, 3, 1, 2).float() / 127.5 - 1)
    flipped = random_flip(x, generator=torch.Generator().manual_seed(0))
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54


def test_split_selection_in_both_readers(tmp_path, ray_local):
    out, expected = prepared_cifar10(tmp_path, "--splits", "train", "test", per_batch=3)
    shards = ShardSet.open(str(out))
    test_rows = rows_by_index(shards.iter_batches(4, splits=["test"]))
    assert sorted(test_rows) == list(range(15, 18))  # train is rows 0..14
    assert all(np.array_equal(test_rows[15 + i][0], expected["test"][0][i]) for i in range(3))
    ds = shards.ray_dataset(splits=["train"], columns=["index", "split"])
    assert sorted(r["index"] for r in ds.take_all()) == list(range(15))
    with pytest.raises(DataError, match=r"has no split\(s\) \['val'\]; it has \['train', 'test'\]"):
        shards.ray_dataset(splits=["val"])


@pytest.fixture
def prepared(tmp_path):
    return prepared_cifar10(tmp_path, per_batch=2)[0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is not valid JSON"),
        ('{"format_version": 1, "count": ', "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not a manifest object"),
        ('{"format_version": 1}', "lacks ['count'"),
    ],
    ids=["empty", "cut-short", "not-an-object", "no-shards"],
)
def test_a_bad_manifest_is_named(prepared, text, message):
    (prepared / MANIFEST).write_text(text)
    with pytest.raises(DataError) as e:
        ShardSet.open(str(prepared))
    assert f"{prepared}/manifest.json" in str(e.value) and message in str(e.value)
    proc = run_main("jobs/train.py", "--preset", "tiny", "--data", prepared)
    assert (
        proc.returncode == 1 and proc.stderr.startswith(f"error: {prepared}/manifest.json") and "Ray" not in proc.stderr
    )


@pytest.mark.parametrize("path", ["../../../etc/passwd", "/etc/passwd", "sub/shard-00000-0123456789abcdef.parquet"])
def test_a_manifest_cannot_point_outside_its_folder(prepared, path):
    manifest = json.loads((prepared / MANIFEST).read_text())
    manifest["shards"][0]["path"] = path  # with a size to match, verify="none" would have opened it
    (prepared / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="is not a shard file of its own folder"):
        ShardSet.open(str(prepared), verify="none")


def test_two_writers_into_one_folder_cannot_both_finish(tmp_path):
    """A second run into a folder a first run is still writing stops at once, naming the first;
    the first finishes. Two runs that both passed the first check: the later one stops right
    before its manifest, and only one data set is ever complete."""
    import threading

    from diffusion.platform.shards import write_shards
    from diffusion.platform.sources import Source

    location = open_location(str(tmp_path / "shared"))
    started, go = threading.Event(), threading.Event()

    def chunks(seed):
        rng = np.random.default_rng(seed)
        started.set()
        go.wait(30)
        yield "train", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), np.zeros(4, dtype=np.int64)

    results = {}
    first = threading.Thread(
        target=lambda: results.setdefault(
            "first", write_shards(Source("a", ["train"], ["c"], chunks(0)), location, quiet=True)
        )
    )
    first.start()
    assert started.wait(30)
    with pytest.raises(DataError, match="another run is writing a data set to .* \\(.claim-"):
        write_shards(Source("b", ["train"], ["c"], chunks(1)), location, quiet=True)
    go.set()
    first.join(30)
    assert results["first"]["dataset"] == "a" and ShardSet.open(str(tmp_path / "shared")).manifest["dataset"] == "a"
    assert not [p for p in (tmp_path / "shared").iterdir() if p.name.startswith(".claim-")]

    def overtaken():  # an older claim appears while this writer writes its shards
        location.write_bytes(".claim-00000000000000000000-0000", b'{"host": "elsewhere"}')
        yield "train", np.zeros((4, 8, 8, 3), dtype=np.uint8), np.zeros(4, dtype=np.int64)

    with pytest.raises(DataError, match="another run is writing a data set .*host elsewhere"):
        write_shards(Source("late", ["train"], ["c"], overtaken()), location, quiet=True)
    assert not (tmp_path / "shared" / MANIFEST).exists()  # stopped right before its manifest: nothing complete
