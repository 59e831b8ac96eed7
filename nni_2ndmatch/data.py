"""Training images: the built-in digits (scikit-learn, offline) or an image folder, read lazily."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
BUILTIN_DATA = ("digits",)


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
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
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
        self.conditioning = conditioning
        self.prompts = None
        if conditioning is not None:
            key, size = conditioning
            if key == "class_labels" and size < 10:
                raise ValueError(f"the model has {size} classes; the digits need at least 10")
            if key == "encoder_hidden_states":
                g = torch.Generator().manual_seed(0)
                self.prompts = torch.randn(10, self.LABEL_TOKENS, size, generator=g)
            elif key != "class_labels":
                raise ValueError(f"conditioning={key!r} is not allowed; allowed: class_labels, encoder_hidden_states")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor | dict[str, Tensor]:
        image = self.images[index]
        if self.dequantize:
            level = ((image + 1.0) * (self.LEVELS - 1) / 2).round()
            image = (level + torch.rand_like(image)) / self.LEVELS * 2.0 - 1.0
        if self.conditioning is None:
            return image
        label = self.labels[index]
        value = label if self.prompts is None else self.prompts[label]
        return {"sample": image, self.conditioning[0]: value}


def image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a training image (it does not decode, or its mode has no greyscale/RGB
    conversion), or None. The whole file is decoded: a truncated image fails here, not mid-run."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            img.convert("RGB")
            if min(img.size) < 1:
                return f"it is {img.width}x{img.height} pixels"
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError, ...)
        return f"it does not decode as an image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursively, sorted), resized to ``resolution`` and scaled to [-1, 1].

    Files whose suffix is not an image's (IMAGE_SUFFIXES) are left out, and a log line says how
    many. Every image is decoded once here, before any work: a file that does not decode is an
    error naming it, or, with ``skip_bad_images``, left out with a warning naming it. Afterwards
    files are opened one at a time when the loop asks for them, so folders of any size work.
    ``channels``: 1 (greyscale) or 3 (RGB).
    """

    def __init__(self, root: str | os.PathLike, resolution: int, channels: int = 3,
                 skip_bad_images: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"data path {str(self.root)!r} is not a folder")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} is not allowed; allowed: 1, 3")
        files = sorted(p for p in self.root.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if len(images) < len(files):
            logger.info("data path %s: %d file(s) without an image suffix (%s) left out", self.root,
                        len(files) - len(images), ", ".join(IMAGE_SUFFIXES))
        bad = {p: why for p in images if (why := image_problem(p)) is not None}
        if bad and not skip_bad_images:
            listed = "; ".join(f"{p}: {why}" for p, why in list(bad.items())[:10])
            more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
            raise ValueError(f"data path {str(self.root)!r}: {len(bad)} bad image(s): {listed}{more}; remove them "
                             "or set data.skip_bad_images: true")
        for p, why in bad.items():
            logger.warning("left out %s: %s", p, why)
        self.files = [p for p in images if p not in bad]
        if not self.files:
            raise ValueError(f"data path {str(self.root)!r} holds no usable images ({', '.join(IMAGE_SUFFIXES)})")
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        from PIL import Image

        with Image.open(self.files[index]) as img:
            img = img.convert("L" if self.channels == 1 else "RGB")
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((self.resolution,) * 2, Image.BICUBIC)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        x = data.view(self.resolution, self.resolution, self.channels).permute(2, 0, 1).float()
        return x / 127.5 - 1.0


METADATA_FILE = "metadata.jsonl"


def digit_captions(labels: Tensor) -> list[str]:
    """The built-in digits' captions for a text-to-image pipeline: "a handwritten digit 3"."""
    return [f"a handwritten digit {int(d)}" for d in labels]


def read_metadata(root: Path, files: list[Path], key: str = "text") -> list[Any]:
    """Each of ``files``'s ``key`` from ``root``/metadata.jsonl, the Hugging Face imagefolder
    convention: one JSON object per line, ``{"file_name": "a/b.png", "text": "..."}`` (captions) or
    ``{"file_name": ..., "label": 3}`` (class labels), the path relative to ``root``. A missing
    file, a malformed line, an entry whose ``text`` is not a string (``label`` not an integer >= 0),
    an entry naming no file, two entries for one file and an image without an entry are each a
    ValueError naming the file (and line)."""
    import json

    what = {"text": "a caption (a string, empty for none)", "label": "a class label (an integer >= 0)"}[key]
    meta = root / METADATA_FILE
    if not meta.is_file():
        raise ValueError(f"data path {str(root)!r} has no {METADATA_FILE}; the teacher needs {what} per image: one "
                         f'line per image, {{"file_name": "relative/path.png", "{key}": ...}}')
    values: dict[Path, Any] = {}
    for n, line in enumerate(meta.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta} line {n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON: {e}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise ValueError(f"{where}: each line must be an object with a string \"file_name\"")
        value = entry.get(key)
        valid = isinstance(value, str) if key == "text" else \
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not valid:
            raise ValueError(f"{where}: \"{key}\" is {value!r}; each image needs {what}")
        file = (root / entry["file_name"]).resolve()
        if not file.is_file():
            raise ValueError(f"{where}: file_name {entry['file_name']!r} names no file in {str(root)!r}")
        if file in values:
            raise ValueError(f"{where}: a second entry for {entry['file_name']!r}; give each image one entry")
        values[file] = value
    missing = [f for f in files if f.resolve() not in values]
    if missing:
        listed = ", ".join(str(f.relative_to(root)) for f in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{meta}: {len(missing)} image(s) have no entry: {listed}")
    return [values[f.resolve()] for f in files]


def batch_indices(step: int, num_items: int, batch_size: int, seed: int) -> Tensor:
    """Dataset indices of global batch ``step``: a fresh seeded permutation per epoch, last
    incomplete batch dropped. A pure function of its arguments, so a resumed run sees the same data."""
    per_epoch = num_items // batch_size
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[j * batch_size:(j + 1) * batch_size]


def collate(items: list[Any], device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
    """Stack data items: image tensors, or dicts with the image under "sample" and the model's
    conditioning (class_labels, encoder_hidden_states, ...) under its keyword names."""
    if isinstance(items[0], dict):
        x0 = torch.stack([item["sample"] for item in items]).to(device)
        kwargs = {k: torch.stack([torch.as_tensor(item[k]) for item in items]).to(device)
                  for k in items[0] if k != "sample"}
        return x0, kwargs
    return torch.stack(items).to(device), {}
