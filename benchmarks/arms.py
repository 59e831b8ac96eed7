"""What the quality and cost benchmarks train: the teachers (data sets) and the finetuning arms.

An arm is a finetuner with its options, by name:
    dsm, kd                 the baselines
    kd-perturb              kd with ``kd_perturb: noise`` (kd at x_t +/- s_t g: the control)
    2ndmatch                2ndmatch with the benchmark's Jacobian options
    2ndmatch-every<K>       the same with ``jac_every: K``
    2ndmatch-paper          2ndmatch in the paper's form (PAPER), whatever the benchmark's options

A teacher folder may hold a ``scheduler_config.json`` (a flow-matching teacher,
train_digits_assets.py --objective flow): its training objective, which the arms and the sampling
then follow.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

ROOT = Path(__file__).resolve().parent.parent
#: the setting docs/results.md measured best (README: the variant)
VARIANT = {"jac_match": "vector", "jac_weighting": "noise", "lambda_jac": 1.0, "jac_reference_dims": 1}
#: the reference regime (the authors' training script, docs/results.md): pruning ratio and loop options
REFERENCE_RATIO = 0.3
REFERENCE_LOOP = {"batch_size": 2, "lr": 2e-4, "grad_clip": 1.0, "ema_decay": 0.9983, "dropout": 0.1}
#: the paper's term (norm matching, no weighting), its lambda_jac 0.1 balanced from 32x32x3 (docs/results.md)
PAPER = {"jac_match": "norm", "jac_weighting": "none", "lambda_jac": 0.1, "jac_reference_dims": 3072}
FIXED_ARMS = {"dsm": ("dsm", {}), "kd": ("kd", {}), "kd-perturb": ("kd", {"kd_perturb": "noise"}),
              "2ndmatch-paper": ("2ndmatch", PAPER)}
ARM_HELP = "dsm, kd, kd-perturb, 2ndmatch, 2ndmatch-every<K>, 2ndmatch-paper"


def arm(name: str, jac_options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(finetuner, options) of the arm ``name``; 2ndmatch arms take ``jac_options``."""
    if name in FIXED_ARMS:
        return FIXED_ARMS[name]
    every = re.fullmatch(r"2ndmatch(?:-every([1-9][0-9]*))?", name)
    if every is None:
        raise ValueError(f"arm {name!r} is unknown; allowed: {ARM_HELP}")
    return "2ndmatch", {**jac_options, **({"jac_every": int(every.group(1))} if every.group(1) else {})}


def parse_arms(text: str) -> list[str]:
    """A comma-separated list of arm names, each checked, in the order given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        arm(name, {})
    if len(set(names)) != len(names):
        raise ValueError(f"arms {text!r}: each arm once")
    return names


@dataclass
class Teacher:
    """A dense teacher with its data and the feature network of its digits-FID."""

    name: str
    model: nn.Module
    train: Any  # the training images (a DigitsDataset or MnistDataset)
    test_images: Any  # the held-out images digits-FID compares with
    classifier: nn.Module
    resolution: int
    weights_sha256: str
    scheduler: Any = None  # the training objective's scheduler; None: the reference DDPM schedule


def load_teacher(data: str, folder: str | None = None, dequantize: bool = False) -> Teacher:
    """The shipped teacher of ``data`` (digits or mnist), or a diffusers model ``folder`` trained on it."""
    from nni_2ndmatch.data import DigitsDataset, MnistDataset
    from nni_2ndmatch.models import load_diffusers_model
    from nni_2ndmatch.models.digits import (
        MNIST_RESOLUTION,
        MNIST_TEACHER_DIR,
        RESOLUTION,
        TEACHER_DIR,
        load_digits_classifier,
        load_mnist_classifier,
    )

    if data == "digits":
        resolution, shipped, classifier = RESOLUTION, TEACHER_DIR, load_digits_classifier()
        train, test = DigitsDataset(resolution, "train", dequantize=dequantize), DigitsDataset(resolution, "test")
    elif data == "mnist":
        if dequantize:
            raise ValueError("--dequantize goes with --data digits")
        resolution, shipped, classifier = MNIST_RESOLUTION, MNIST_TEACHER_DIR, load_mnist_classifier()
        train, test = MnistDataset(resolution, "train"), MnistDataset(resolution, "test")
    else:
        raise ValueError(f"data {data!r} is unknown; allowed: digits, mnist")
    path = Path(folder) if folder else shipped
    weights = path / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{path}: no {weights.name} there (a diffusers model folder is needed)")
    return Teacher(data if not folder else f"{data}:{path.name}", load_diffusers_model(path).eval(), train,
                   test.images, classifier, resolution, hashlib.sha256(weights.read_bytes()).hexdigest(),
                   teacher_scheduler(path))


def teacher_scheduler(folder: Path) -> Any:
    """The flow-matching scheduler a teacher folder's ``scheduler_config.json`` describes, or None
    (no such file: the reference DDPM schedule)."""
    file = folder / "scheduler_config.json"
    if not file.is_file():
        return None
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = json.loads(file.read_text())
    if not str(config.get("_class_name", "")).startswith("FlowMatch"):
        raise ValueError(f"{file}: _class_name {config.get('_class_name')!r}; allowed: a flow-matching scheduler "
                         "(FlowMatchEulerDiscreteScheduler), or no file for the reference DDPM schedule")
    return FlowMatchEulerDiscreteScheduler.from_config(config)
