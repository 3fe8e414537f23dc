"""Feature networks trained on a data set's own train split, standing in for FID's Inception
where its ImageNet features mean little or its weights are not at hand (they are not part of
this project): "judges" of samples that never saw a sample.

- The 8x8 digits: a small CNN (`DigitsClassifier`), trained deterministically in seconds on a
  CPU and cached beside the shards (`train_classifier`).
- CIFAR-10: a ResNet-20 (He et al. 2016, section 4.2: 3 stages of 3 basic blocks, 16/32/64
  channels), trained once by bench/cifar10_judge.py on the 50,000 train images and kept in the
  package (`cifar10_judge`), so that every machine judges alike.

Each is the same kind of judge:
- its penultimate features (64-d) are the space of an FD: the Frechet distance of FID
  (`fid.frechet_distance`) between samples and real images there. It is not FID: another
  network, other features, numbers on another scale, not comparable to published FIDs;
- its 10 class logits give the classifier score, the Inception Score's formula on its classes
  (`fid.inception_score`), the share of samples it classifies with confidence >= 0.9, and the
  share of samples given each class.

Same interface as `fid.InceptionFeatures`: uint8 images (N, H, W, C) -> (features, logits).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fid import FeatureStats, frechet_distance, inception_score

FEATURE_DIM = 64
CONFIDENT = 0.9  # a sample counts as recognisable when its top class has at least this probability
CLASSIFIER_SCORE_SPLITS = 1  # the classifier score over all samples at once (IS's convention is 10 splits)
RECIPE = {"epochs": 40, "batch_size": 64, "lr": 2e-3, "seed": 0}  # train_classifier's; part of every cache key


class Judge(nn.Module):
    """A classifier seen as a judge: `logits_and_features` on floats in [0, 1] (N, C, H, W)."""

    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images (N, H, W, C) -> (features, class logits), both float64."""
        device = next(self.parameters()).device
        logits, features = self.eval().logits_and_features(images.to(device).permute(0, 3, 1, 2).float() / 255)
        return features.double(), logits.double()

    @classmethod
    def from_state(cls, state: dict) -> Judge:
        """A judge from its state ({"config", "weights"}: `train_classifier`'s, or the kept CIFAR-10 judge's)."""
        net = cls(**state["config"])
        net.load_state_dict(state["weights"])
        return net.eval()


class DigitsClassifier(Judge):
    def __init__(self, image_size: int = 8, channels: int = 1, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (image_size // 2) ** 2, FEATURE_DIM),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.25), nn.Linear(FEATURE_DIM, classes))

    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return self.head(features), features


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (a strided 1x1 projection where the
    shape changes: He et al.'s option B)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


CIFAR10_JUDGE = Path(__file__).parent / "judges" / "cifar10-resnet20.pt"  # made by bench/cifar10_judge.py
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class ResNet20(Judge):
    """He et al. 2016's CIFAR ResNet with n = 3 (20 layers, 0.27M parameters); its features are
    the 64-d global average of the last stage."""

    def __init__(self, classes: int = 10, blocks_per_stage: int = 3, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1), persistent=False)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                layers.append(BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.stages(self.stem((x - self.mean) / self.std)).mean((2, 3))
        return self.fc(features), features


def train_classifier(
    images: Tensor,
    labels: Tensor,
    epochs: int = RECIPE["epochs"],
    batch_size: int = RECIPE["batch_size"],
    lr: float = RECIPE["lr"],
    seed: int = RECIPE["seed"],
) -> dict:
    """Train a `DigitsClassifier` on uint8 images (N, H, W, C) and labels (N,) on the CPU,
    seeded (initialisation, dropout, batch order): the same inputs give the same weights on the
    same machine. Returns its state: {"config", "weights"}."""
    n, size, _, channels = images.shape
    config = {"image_size": size, "channels": channels, "classes": int(labels.max()) + 1}
    torch.manual_seed(seed)
    net = DigitsClassifier(**config)
    generator = torch.Generator().manual_seed(seed)
    x = images.permute(0, 3, 1, 2).float() / 255
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * -(-n // batch_size))
    net.train()
    for _ in range(epochs):
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            logits, _ = net.logits_and_features(x[batch])
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return {"config": config, "weights": {k: v.clone() for k, v in net.state_dict().items()}}


def confident_share(logits: Tensor, threshold: float = CONFIDENT) -> float:
    """The share of rows whose most likely class has probability >= `threshold`."""
    return (torch.as_tensor(logits).softmax(1).amax(1) >= threshold).double().mean().item()


def cifar10_judge(path: Path = CIFAR10_JUDGE) -> ResNet20:
    """The kept CIFAR-10 judge (its record, accuracy and machine, is the .json beside it)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"the CIFAR-10 judge {path} is missing: remake it with python bench/cifar10_judge.py")
    return ResNet20.from_state(torch.load(path, weights_only=True))


def class_shares(logits: Tensor) -> list[float]:
    """The share of rows given each class (the most likely one)."""
    logits = torch.as_tensor(logits)
    return (torch.bincount(logits.argmax(1), minlength=logits.shape[1]).double() / len(logits)).tolist()


def class_agreement(logits: Tensor, labels: Tensor) -> tuple[float, list[float]]:
    """The share of rows classified as their `labels` (the class a sample was asked for), overall
    and per class (NaN for a class no row asked for)."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    right = (logits.argmax(1) == labels).double()
    per_class = [right[labels == c].mean().item() if (labels == c).any() else math.nan for c in range(logits.shape[1])]
    return right.mean().item(), per_class


def accuracy(net: Judge, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """The share of `images` (uint8, N x H x W x C) classified as `labels`."""
    right = sum(
        (net(images[i : i + batch_size])[1].argmax(1).cpu() == labels[i : i + batch_size]).sum().item()
        for i in range(0, len(images), batch_size)
    )
    return right / len(images)


class Scorer:
    """A judge's view of sets of uint8 (N, H, W, C) images against a reference set (the train
    split): the FD in its features, the classifier score, the confident share and the class
    shares. FD's estimate falls with N, so each set is also measured on its first `floor_n`
    images, the size of the floor (the real test split against the reference), like for like."""

    def __init__(self, net: Judge, reference: np.ndarray, test: np.ndarray, batch_size: int = 1000):
        self.net, self.batch_size = net, batch_size
        self.reference = self.stats(reference)[0]
        self.floor_n = len(test)
        self.floor = self.fd(self.stats(test)[0])

    def stats(self, images: np.ndarray) -> tuple[FeatureStats, Tensor]:
        """Feature statistics and the class logits of `images`, judged in batches."""
        stats, logits = None, []
        for i in range(0, len(images), self.batch_size):
            features, batch_logits = self.net(torch.from_numpy(images[i : i + self.batch_size]))
            stats = (stats or FeatureStats(features.shape[1])).add(features.cpu().numpy())
            logits.append(batch_logits.cpu())
        return stats, torch.cat(logits)

    def fd(self, stats: FeatureStats) -> float:
        return frechet_distance(stats.mu, stats.sigma, self.reference.mu, self.reference.sigma)

    def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict:
        """The measures of `images`; with `labels` (the classes they were asked for, of the
        judge's classes), also the class agreement, overall and per class."""
        stats, logits = self.stats(images)
        measures = {
            "fd": self.fd(stats),
            "fd_at_floor_n": self.fd(self.stats(images[: self.floor_n])[0]),
            "score": inception_score(logits.numpy(), CLASSIFIER_SCORE_SPLITS)[0],
            "confident": confident_share(logits),
            "class_shares": class_shares(logits),
        }
        if labels is not None:
            measures["class_agreement"], measures["class_agreement_per_class"] = class_agreement(logits, labels)
        return measures
