"""Loading and saving diffusers models: local folders, the Hugging Face Hub (config and safetensors
only, no remote code), and parameter counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..files import atomic_dir

# Model classes a folder may name in its config.json; nothing else is ever instantiated.
SUPPORTED_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "SD3Transformer2DModel")


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
    with atomic_dir(path, marker="config.json") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
