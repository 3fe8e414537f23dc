"""Prepare a data set as Parquet shards + manifest.json in a folder or an S3 bucket.

    python jobs/prepare_data.py --dataset cifar10 --out data/cifar10                  # downloads the official archive
    python jobs/prepare_data.py --dataset cifar10 --source ~/cifar-10-python.tar.gz --out s3://bucket/cifar10
    python jobs/prepare_data.py --dataset stl10 --splits train test unlabeled --out data/stl10
    python jobs/prepare_data.py --dataset imagefolder --source ../shared/data/cifar10-jpeg.tar.gz --splits train --out data/cifar10-jpeg
    python jobs/prepare_data.py --dataset digits --out data/digits                    # 8x8 digits, no download

S3: the endpoint comes from --endpoint-url or AWS_ENDPOINT_URL, credentials from the
environment or ~/.aws. Re-running with the same input is a no-op.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusion.platform.cli import add_options, parser, run
from diffusion.platform.settings import Endpoint
from diffusion.platform.sources import CIFAR10_SPLITS, DIGITS_SPLITS, STL10_SPLITS

DATASETS = ["cifar10", "stl10", "digits", "imagefolder"]
DEFAULT_SPLITS = {
    "cifar10": ["train"],
    "stl10": ["train", "test", "unlabeled"],
    "digits": ["train", "test"],
    "imagefolder": None,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--dataset", required=True, choices=DATASETS, help="what to prepare")
    p.add_argument("--out", default=None, help="destination URI: a folder or s3://bucket/prefix (default data/DATASET)")
    p.add_argument("--source", default=None, help="local archive, folder or URL (default: the official download)")
    p.add_argument("--splits", nargs="+", default=None, help="splits to include (cifar10: train; stl10, digits: all)")
    p.add_argument("--size", type=int, default=None, help="imagefolder: resize and center-crop to SIZE x SIZE")
    p.add_argument("--md5", default=None, help="expected md5 of the archive (default: the official one)")
    p.add_argument("--cache-dir", default="~/.cache/ray-diffusion", help="where downloads are kept")
    add_options(p, Endpoint)
    p.add_argument("--shard-mb", type=float, default=32, help="target shard size in MiB")
    args = p.parse_args(argv)
    if args.dataset == "digits" and args.source:
        p.error("--dataset digits comes with scikit-learn: it takes no --source")
    if args.size is not None and args.dataset != "imagefolder":
        p.error("--size applies to --dataset imagefolder only")
    if args.size is not None and args.size < 1:
        p.error(f"--size must be >= 1, got {args.size}")
    if args.dataset == "imagefolder" and not args.source:
        p.error("--dataset imagefolder needs --source DIR or a tar/tar.gz of class sub-folders")
    known = {"cifar10": CIFAR10_SPLITS, "stl10": STL10_SPLITS, "digits": DIGITS_SPLITS}.get(args.dataset)
    args.splits = args.splits or DEFAULT_SPLITS[args.dataset]
    if known and set(args.splits) - set(known):
        p.error(f"unknown {args.dataset} split(s) {sorted(set(args.splits) - set(known))}: choose from {sorted(known)}")
    args.out = args.out or f"data/{args.dataset}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from diffusion.platform.shards import write_shards
    from diffusion.platform.sources import (
        CIFAR10,
        STL10,
        cifar10_source,
        digits_source,
        imagefolder_source,
        resolve_archive,
        stl10_source,
    )
    from diffusion.platform.storage import open_location

    location = open_location(args.out, args.endpoint_url)
    if args.dataset == "imagefolder":
        source = imagefolder_source(Path(args.source).expanduser(), args.splits, args.size)
    elif args.dataset == "digits":
        source = digits_source(args.splits)
    else:
        archive = {"cifar10": CIFAR10, "stl10": STL10}[args.dataset]
        md5 = args.md5 or archive.md5
        path = resolve_archive(archive, args.source, Path(args.cache_dir).expanduser(), md5)
        reader = cifar10_source if args.dataset == "cifar10" else stl10_source
        source = reader(path, args.splits)
        source.fingerprint = {"md5": md5}
    write_shards(source, location, shard_bytes=int(args.shard_mb * 2**20))
    return 0


if __name__ == "__main__":
    run(main)
