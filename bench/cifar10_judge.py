"""Train the CIFAR-10 judge kept in the package: a ResNet-20 (diffusion/classifier.py) trained on
the 50,000 train images alone, never on samples, and tested on the 10,000 test images.
jobs/evaluate.py and bench/quality.py judge CIFAR-10 samples with it when no Inception weights
are given: an FD on its features, its classifier score, the confident share and the class
shares (not FID: see docs/evaluation.md).

    python bench/cifar10_judge.py                                  # the shared JPEG copy, 2 cores: see the .json
    python bench/cifar10_judge.py --source cifar-10-python.tar.gz  # the official archive

SGD with Nesterov momentum, a one-cycle learning rate (linear up for 15% of the steps, then
linear down to 0), weight decay, random crops (4 pixels of reflected padding) and flips. Each
epoch ends in a resumable state under --work: an interrupted run, started again with the same
arguments, goes on from its last epoch. Writes --out (the weights, loadable with
weights_only=True) and beside it a .json: the test accuracy, the recipe, the data's digest,
the machine, torch, the commit and the time it took.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from core import machine  # bench/core.py, beside this script

from diffusion.classifier import CIFAR10_JUDGE, ResNet20, accuracy
from diffusion.speed import use_bf16

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def load_splits(source: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train", "test"}: uint8 images (N, H, W, C) and int64 labels, from the official archive
    (cifar-10-python.tar.gz) or a folder / tar of <split>/<class>/<image> files."""
    from diffusion.platform.sources import CIFAR10, cifar10_source, imagefolder_source

    if source.name == CIFAR10.filename:
        chunks = cifar10_source(source, ["train", "test"]).chunks
    else:
        chunks = imagefolder_source(source, ["train", "test"], None).chunks
    parts: dict[str, tuple[list, list]] = {}
    for split, images, labels in chunks:
        parts.setdefault(split, ([], []))
        parts[split][0].append(images)
        parts[split][1].append(labels)
    return {
        s: (torch.from_numpy(np.concatenate(i)), torch.from_numpy(np.concatenate(lab))) for s, (i, lab) in parts.items()
    }


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops of the reflect-padded images and random left-right flips; x: (N, C, H, W)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    crops = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def recipe_of(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "seed")}


def train(args: argparse.Namespace, data: dict, work: Path) -> tuple[ResNet20, float]:
    """The judge after `args.epochs` epochs, resumed from `work`'s state when it holds this recipe's."""
    images, labels = data["train"]
    x = images.permute(0, 3, 1, 2).contiguous()
    steps_per_epoch = len(x) // args.batch_size  # the last partial batch is dropped
    torch.manual_seed(args.seed)
    net = ResNet20()
    optimizer = torch.optim.SGD(
        net.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        args.lr,
        total_steps=args.epochs * steps_per_epoch,
        pct_start=0.15,
        anneal_strategy="linear",
        cycle_momentum=False,
        div_factor=10,
        final_div_factor=100,
    )
    generator = torch.Generator().manual_seed(args.seed)
    bf16 = use_bf16("auto", torch.device("cpu"), training=True)  # bf16 where the CPU has native bf16
    state_file, epoch, seconds = work / "state.pt", 0, 0.0
    if state_file.exists():
        state = torch.load(state_file, weights_only=True)
        if state["recipe"] == recipe_of(args):
            net.load_state_dict(state["net"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            generator.set_state(state["generator"])
            epoch, seconds = state["epoch"], state["seconds"]
            print(f"resumed from {state_file} after epoch {epoch}", flush=True)
    print(f"{len(x)} train images, {args.epochs} epochs of {steps_per_epoch} steps, {'bf16' if bf16 else 'fp32'}")
    while epoch < args.epochs:
        start, net = time.time(), net.train()
        order = torch.randperm(len(x), generator=generator)[: steps_per_epoch * args.batch_size]
        total = 0.0
        for batch in order.view(steps_per_epoch, args.batch_size):
            inputs = augment(x[batch].float() / 255, generator)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits, _ = net.logits_and_features(inputs)
            loss = F.cross_entropy(logits.float(), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        epoch, seconds = epoch + 1, seconds + time.time() - start
        test_accuracy = accuracy(net, *data["test"])
        print(
            f"epoch {epoch}/{args.epochs}: loss {total / steps_per_epoch:.4f}, test accuracy {test_accuracy:.4f}, "
            f"{(time.time() - start):.0f} s",
            flush=True,
        )
        state = {
            "recipe": recipe_of(args),
            "net": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "generator": generator.get_state(),
            "epoch": epoch,
            "seconds": seconds,
        }
        torch.save(state, work / "state.pt.partial")
        (work / "state.pt.partial").replace(state_file)  # complete before it is visible
    return net.eval(), seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--source", type=Path, default=SHARED_CIFAR, help="CIFAR-10: the official archive, or a folder / tar of JPEGs"
    )
    p.add_argument("--epochs", type=int, default=30, help="passes over the train images")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=0.2, help="the one-cycle schedule's peak learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD's L2 weight decay")
    p.add_argument("--seed", type=int, default=0, help="initialisation, batch order and augmentation")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=CIFAR10_JUDGE, help="the weights file to write (and its .json)")
    p.add_argument("--work", type=Path, default=Path("runs/cifar10-judge"), help="the resumable state's folder")
    args = p.parse_args(argv)
    if not args.source.exists():
        p.error(f"--source {args.source} does not exist: pass the CIFAR-10 archive or a JPEG copy of it")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)

    data = load_splits(args.source)
    net, seconds = train(args, data, args.work)
    test_accuracy = accuracy(net, *data["test"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    torch.save({"config": {"classes": 10}, "weights": net.state_dict()}, partial)
    partial.replace(args.out)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    record = {
        "network": "ResNet-20 (He et al. 2016, option B shortcuts), 64-d pooled features",
        "test_accuracy": test_accuracy,
        "train_images": len(data["train"][1]),
        "test_images": len(data["test"][1]),
        "source": args.source.name,
        "source_sha256": hashlib.sha256(args.source.read_bytes()).hexdigest() if args.source.is_file() else None,
        "recipe": recipe_of(args),
        "precision": "bf16"
        if use_bf16("auto", torch.device("cpu"), training=True)
        else "fp32",  # training's; judging is fp32
        "training_seconds": round(seconds, 1),
        "weights_sha256": hashlib.sha256(args.out.read_bytes()).hexdigest(),
        "machine": machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "commit": commit.strip(),
        "made": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): test accuracy {test_accuracy:.4f}, "
        f"{seconds / 60:.1f} min of training"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
