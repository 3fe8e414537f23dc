"""A feature network for small grey-scale data sets (the 8x8 digits), standing in for FID's
Inception where Inception's ImageNet features mean little: a small CNN classifier trained on
the data set's train split, deterministically, in seconds on a CPU.

- Its 64-d penultimate layer (before the ReLU) is the feature space of "FD-digits": the
  Frechet distance of FID (`fid.frechet_distance`) between samples and real images there.
- Its 10 class logits give the classifier score, the Inception Score's formula on its classes
  (`fid.inception_score`), and the share of samples it classifies with confidence >= 0.9.

Same interface as `fid.InceptionFeatures`: uint8 images (N, H, W, C) -> (features, logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_DIM = 64
CONFIDENT = 0.9  # a sample counts as recognisable when its top class has at least this probability
CLASSIFIER_SCORE_SPLITS = 1  # the classifier score over all samples at once (IS's convention is 10 splits)
RECIPE = {"epochs": 40, "batch_size": 64, "lr": 2e-3, "seed": 0}  # train_classifier's; part of every cache key


class DigitsClassifier(nn.Module):
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
        """x: floats in [0, 1], (N, C, H, W)."""
        features = self.body(x)
        return self.head(features), features

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images (N, H, W, C) -> (64-d features, class logits), both float64."""
        device = self.head[-1].weight.device
        logits, features = self.eval().logits_and_features(images.to(device).permute(0, 3, 1, 2).float() / 255)
        return features.double(), logits.double()

    @classmethod
    def from_state(cls, state: dict) -> DigitsClassifier:
        """A classifier from `train_classifier`'s state ({"config", "weights"})."""
        net = cls(**state["config"])
        net.load_state_dict(state["weights"])
        return net.eval()


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


def accuracy(net: DigitsClassifier, images: Tensor, labels: Tensor) -> float:
    _, logits = net(images)
    return (logits.argmax(1).cpu() == labels).double().mean().item()
