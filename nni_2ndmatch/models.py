"""Built-in model architectures and loading/saving of diffusers models (safetensors only)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .io import atomic_dir

# Model classes a folder may name in its config.json; nothing else is ever instantiated.
SUPPORTED_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")


def _width(channels: tuple[int, ...], width: float, groups: int) -> tuple[int, ...]:
    return tuple(max(groups, int(round(c * width / groups)) * groups) for c in channels)


def tiny_unet(width: float = 1.0) -> nn.Module:
    """A small pixel-space DDPM U-Net for 1x16x16 images (the built-in digits default)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=_width((32, 64, 64), width, 8), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None)


def ddpm_cifar10(width: float = 1.0) -> nn.Module:
    """The layout of google/ddpm-cifar10-32 (35.7M parameters at width 1), randomly initialised."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=_width((128, 256, 256, 256), width, 32), norm_num_groups=32,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=None)


BUILTIN_MODELS: dict[str, Callable[[float], nn.Module]] = {"tiny-unet": tiny_unet, "ddpm-cifar10": ddpm_cifar10}


def build_builtin(name: str, width: float = 1.0, seed: int = 0) -> nn.Module:
    """A built-in architecture with weights initialised from ``seed`` (no pretrained weights)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"builtin={name!r} is unknown; available: {', '.join(BUILTIN_MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILTIN_MODELS[name](width)


def load_diffusers_model(path: str | os.PathLike) -> nn.Module:
    """Load a diffusers model folder (``save_pretrained``) from safetensors weights only."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise ValueError(f"model path {str(path)!r} is not a folder")
    if not config_file.is_file():
        raise ValueError(f"model path {str(path)!r} has no config.json; expected a diffusers model folder")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{config_file} is not a valid diffusers config: {e}") from None
    if class_name not in SUPPORTED_CLASSES:
        raise ValueError(f"{config_file}: _class_name={class_name!r} is not supported; "
                         f"allowed: {', '.join(SUPPORTED_CLASSES)}")
    import diffusers

    return getattr(diffusers, class_name).from_pretrained(path, use_safetensors=True)


def save_diffusers_model(model: Any, path: str | os.PathLike) -> None:
    """``save_pretrained`` in safetensors, into a temporary folder renamed into place."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
