"""The built-in digits assets: a dense DDPM teacher and a feature network for digits-FID, for
scikit-learn's digits (8x8) and for MNIST (28x28).

Each is trained on the train split of its data at its native resolution by
``benchmarks/train_digits_assets.py`` and ships in ``nni_2ndmatch/assets`` as safetensors + JSON.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import DigitsDataset, MnistDataset
from ..files import load_tensors
from ..scoped import seeded, seeded_generator
from .loading import load_diffusers_model

ASSETS = Path(__file__).resolve().parent.parent / "assets"


TEACHER_DIR = ASSETS / "digits_teacher"


CLASSIFIER_FILE = ASSETS / "digits_classifier.safetensors"


RESOLUTION = 8


MNIST_TEACHER_DIR = ASSETS / "mnist_teacher"


MNIST_CLASSIFIER_FILE = ASSETS / "mnist_classifier.safetensors"


MNIST_RESOLUTION = 28


def load_digits_teacher() -> nn.Module:
    """The shipped dense teacher (a diffusers UNet2DModel), in eval mode."""
    return _load_teacher(TEACHER_DIR, "digits")


def load_mnist_teacher() -> nn.Module:
    """The shipped dense MNIST teacher (a diffusers UNet2DModel for 1x28x28), in eval mode."""
    return _load_teacher(MNIST_TEACHER_DIR, "mnist")


def _load_teacher(folder: Path, data: str) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise ValueError(f"the built-in {data} teacher is missing from {folder}; reinstall the package "
                         f"or run benchmarks/train_digits_assets.py --data {data}")
    return load_diffusers_model(folder).eval()


class DigitsClassifier(nn.Module):
    """A small CNN for 1x8x8 digits (or 1x28x28 MNIST: the map is averaged down to 4x4 before the
    dense layers, which at 8x8 changes nothing); ``features`` (64-d, before the last layer) feed
    digits-FID."""

    FEATURES = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, self.FEATURES)
        self.head = nn.Linear(self.FEATURES, 10)

    def features(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(F.relu(self.conv3(x)), 4)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def load_digits_classifier() -> DigitsClassifier:
    return _load_classifier(CLASSIFIER_FILE, "digits")


def load_mnist_classifier() -> DigitsClassifier:
    """The feature network of MNIST's digits-FID (the digits classifier's architecture at 28x28)."""
    return _load_classifier(MNIST_CLASSIFIER_FILE, "mnist")


def _load_classifier(file: Path, data: str) -> DigitsClassifier:
    if not file.is_file():
        raise ValueError(f"the built-in {data} classifier is missing ({file}); reinstall the package "
                         f"or run benchmarks/train_digits_assets.py --data {data}")
    with seeded(0):  # its initialisation, replaced by the file's weights, leaves the global stream alone
        model = DigitsClassifier()
    model.load_state_dict(load_tensors(file), strict=True)
    return model.eval()


def _shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random shifts by up to one pixel (the background is -1)."""
    size = x.shape[-1]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy:dy + size, dx:dx + size]


def train_classifier(seed: int = 0, epochs: int = 40, batch_size: int = 64,
                     data: str = "digits") -> tuple[DigitsClassifier, float]:
    """Train on the train split of ``data`` (digits or mnist, with one-pixel shifts); returns the
    model and its test accuracy."""
    train, test = (DigitsDataset(RESOLUTION, "train"), DigitsDataset(RESOLUTION, "test")) if data == "digits" \
        else (MnistDataset(MNIST_RESOLUTION, "train"), MnistDataset(MNIST_RESOLUTION, "test"))
    g = seeded_generator(seed)
    with seeded(seed):
        model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * -(-len(train) // batch_size))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(train), generator=g).split(batch_size):
            loss = F.cross_entropy(model(_shift(train.images[idx], g)), train.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test.images).argmax(1) == test.labels).float().mean().item()
    return model, accuracy
