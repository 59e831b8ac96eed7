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
SUPPORTED_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")


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


PIPELINE_INDEX = "model_index.json"
DENOISERS = ("unet", "transformer")
#: Pipeline components that make a pipeline latent or text-conditional: not trained on yet.
LATENT_OR_TEXT = ("vae", "text_encoder", "text_encoder_2", "tokenizer")
#: The noise schedule the finetuning uses (nni_2ndmatch.method.default_scheduler); a pipeline's
#: scheduler config must agree with it on these keys.
TRAINING_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                     "prediction_type": "epsilon", "trained_betas": None}


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / PIPELINE_INDEX).is_file()


def pipeline_denoiser(path: str | os.PathLike) -> str:
    """The component name of a pixel-space diffusers pipeline's denoiser ("unet" or "transformer"),
    after checking that the pipeline is one the finetuning can train: no VAE or text encoder, and
    a scheduler with the training schedule (:data:`TRAINING_SCHEDULE`). Otherwise a ValueError
    naming the file, the entry and what is allowed."""
    path = Path(path)
    index_file = path / PIPELINE_INDEX
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index_file} is not valid JSON: {e}") from None
    components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
    denoisers = [k for k in DENOISERS if k in components]
    if not denoisers:
        raise ValueError(f"{index_file}: no denoiser component; expected one of {', '.join(DENOISERS)} "
                         f"(components: {', '.join(components)})")
    latent = [k for k in LATENT_OR_TEXT if k in components]
    if latent:
        raise ValueError(f"{index_file}: the pipeline has {', '.join(latent)}: latent and text-conditional "
                         "pipelines are not trained on yet; allowed: pixel-space pipelines (a unet or transformer "
                         "and a scheduler, e.g. DDPMPipeline)")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if "scheduler" in components and scheduler_file.is_file():
        schedule = json.loads(scheduler_file.read_text())
        for key, want in TRAINING_SCHEDULE.items():
            got = schedule.get(key, want if key in ("prediction_type", "trained_betas") else None)
            if got != want and not (isinstance(got, float) and isinstance(want, float) and abs(got - want) < 1e-12):
                raise ValueError(f"{scheduler_file}: {key}={got!r} is not supported yet; the finetuning trains "
                                 f"with {key}={want!r} (linear betas 1e-4..0.02, 1000 steps, epsilon)")
    return denoisers[0]


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
