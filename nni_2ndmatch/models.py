"""Built-in model architectures and loading/saving of diffusers models (safetensors only)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

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


def tiny_unet_cond(width: float = 1.0) -> nn.Module:
    """A small text-conditional U-Net (cross-attention on 32-d token embeddings) for 1x16x16 images."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=_width((32, 64), width, 8), norm_num_groups=8,
                                cross_attention_dim=32, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_dit(width: float = 1.0) -> nn.Module:
    """A small class-conditional DiT (10 classes, 2x2 patches) for 1x16x16 images."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=max(2, int(round(16 * width))),
                                 in_channels=1, out_channels=1, num_layers=2, sample_size=16, patch_size=2,
                                 num_embeds_ada_norm=10)


def digits_teacher(width: float = 1.0) -> nn.Module:
    """The shipped DDPM trained on the digits (1x8x8, the tiny-unet layout): pretrained weights."""
    if width != 1.0:
        raise ValueError(f"width={width!r} is not allowed for the pretrained builtin 'digits-teacher'; allowed: 1.0")
    from .digits import load_digits_teacher

    return load_digits_teacher()


BUILTIN_MODELS: dict[str, Callable[[float], nn.Module]] = {
    "digits-teacher": digits_teacher, "tiny-unet": tiny_unet, "tiny-unet-cond": tiny_unet_cond, "tiny-dit": tiny_dit,
    "ddpm-cifar10": ddpm_cifar10}


def conditioning_of(model: nn.Module) -> tuple[str, int] | None:
    """What a model is conditioned on besides the timestep: ("class_labels", number of classes)
    for a class-conditional DiT, ("encoder_hidden_states", embedding width) for a cross-attention
    U-Net, None for an unconditional model."""
    config = getattr(model, "config", None)
    if type(model).__name__ == "DiTTransformer2DModel":
        return "class_labels", int(config.num_embeds_ada_norm)
    dim = getattr(config, "cross_attention_dim", None)
    if dim:
        return "encoder_hidden_states", int(dim if isinstance(dim, int) else dim[0])
    return None


def example_conditioning(model: nn.Module, batch: int, seed: int = 0) -> dict[str, Tensor]:
    """Seeded stand-in conditioning of the kind ``model`` takes, as keyword arguments for a batch
    of ``batch``: {} for an unconditional model, random ``class_labels`` for a class-conditional
    DiT, 4 random token embeddings as ``encoder_hidden_states`` for a cross-attention U-Net."""
    kind = conditioning_of(model)
    if kind is None:
        return {}
    g = torch.Generator().manual_seed(seed)
    key, size = kind
    if key == "class_labels":
        return {key: torch.randint(0, size, (batch,), generator=g)}
    return {key: torch.randn(batch, 4, size, generator=g)}


def build_builtin(name: str, width: float = 1.0, seed: int = 0) -> nn.Module:
    """A built-in architecture with weights initialised from ``seed`` (``digits-teacher``: pretrained)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"builtin={name!r} is unknown; available: {', '.join(BUILTIN_MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILTIN_MODELS[name](width)


def model_class(path: str | os.PathLike) -> str:
    """The supported diffusers class a model folder's config.json names (else a clear error)."""
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
    return class_name


def load_diffusers_model(path: str | os.PathLike) -> nn.Module:
    """Load a diffusers model folder (``save_pretrained``) from safetensors weights only."""
    import diffusers

    return getattr(diffusers, model_class(path)).from_pretrained(str(path), use_safetensors=True)


def load_hub_model(repo_id: str, subfolder: str | None = None) -> nn.Module:
    """Download a diffusers model from the Hugging Face Hub: its config first (the class is checked
    before any weights come), then safetensors weights only. No remote code is ever run.
    Offline, or where the network does not reach the Hub, a clear error says what to do instead."""
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=[prefix + "config.json"]))
        model_class(root / prefix)
        root = Path(snapshot_download(repo_id, allow_patterns=[prefix + "config.json", prefix + "*.safetensors"]))
    except OSError as e:  # offline, unreachable, unknown repo (huggingface_hub's errors are OSErrors)
        raise ValueError(f"hub={repo_id!r}: could not download it from the Hugging Face Hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]}); where the network allows, run `hf download {repo_id} "
                         f"--local-dir DIR` and give the downloaded model folder as path") from None
    return load_diffusers_model(root / prefix)


def save_diffusers_model(model: Any, path: str | os.PathLike) -> None:
    """``save_pretrained`` in safetensors, into a temporary folder renamed into place."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
