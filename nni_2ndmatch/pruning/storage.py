"""The save format of a pruned student: its pruned diffusers class's own folder (``save_pretrained``:
``config.json`` with the dense config, ``_class_name`` PrunedX and the ``pruning_plan`` entry, and
``diffusion_pytorch_model.safetensors``), which diffusers' ``from_pretrained`` also reads. Folders of
the earlier format (``model.safetensors``, the dense ``config.json`` and ``pruning_plan.json``) still
load. Never a pickle; a damaged folder is a clear error naming the file and the entry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..files import atomic_dir, load_tensors, read_json_object
from ..models import (
    SUPPORTED_CLASSES,
    is_pipeline_folder,
    load_diffusers_model,
    pipeline_denoiser,
    save_diffusers_model,
)
from ..models.pipelines import DENOISERS, null_components, pipeline_components
from ..utils import json_kind
from .component import PREFIX, as_component, check_structure, dense_of, save_as_component
from .plan import apply_checked_plan, check_plan
from .portable import PRUNED_KEYS, STRUCTURE_KEY

CONFIG_FILE, WEIGHTS_FILE = "config.json", "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS_FILE, PLAN_FILE = "model.safetensors", "pruning_plan.json"  # the earlier format


def save_pruned(student: nn.Module, folder: str | os.PathLike) -> None:
    """Write a pruned student as its pruned class (``as_component``) does with ``save_pretrained``:
    the config with the plan in it, and safetensors weights. Written atomically; ``student`` keeps
    its class and config."""
    if getattr(student, "pruning_plan", None) is None:
        raise ValueError("the model has no pruning_plan; save it with save_pretrained instead")
    with atomic_dir(folder, marker=CONFIG_FILE) as tmp:
        save_as_component(student, tmp)


def _pruned_class_name(folder: Path) -> str | None:
    """The class of a folder written by a pruned class's ``save_pretrained`` (e.g. PrunedUNet2DModel)."""
    try:
        name = read_json_object(folder / CONFIG_FILE).get("_class_name")
    except (OSError, ValueError):
        return None
    return name if isinstance(name, str) and name.startswith(PREFIX) else None


def is_pruned_folder(folder: str | os.PathLike) -> bool:
    """A pruned student: the plan file beside a dense config, or a pruned class's save_pretrained."""
    return (Path(folder) / PLAN_FILE).is_file() or _pruned_class_name(Path(folder)) is not None


def load_model_folder(folder: str | os.PathLike) -> nn.Module:
    """A pruned-student folder, a diffusers model folder, or a pipeline folder (its
    denoiser; see ``pipeline_denoiser``)."""
    if is_pipeline_folder(folder):
        folder = Path(folder) / pipeline_denoiser(folder)
    if is_pruned_folder(folder):
        return load_pruned(folder)

    return load_diffusers_model(folder)


def _load_weights(model: nn.Module, path: Path, plan_source: str) -> None:
    """Load the weights strictly; names or shapes other than the model's are a ValueError naming the file."""
    tensors = load_tensors(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{len(missing)} tensor(s) missing, e.g. {missing[0]!r}" if missing else "",
                    f"{len(unexpected)} unexpected, e.g. {unexpected[0]!r}" if unexpected else "",
                    f"{len(shapes)} of another shape, e.g. {shapes[0]!r}: saved {list(tensors[shapes[0]].shape)}, "
                    f"the plan gives {list(expected[shapes[0]].shape)}" if shapes else ""]
        raise ValueError(f"{path} does not match {plan_source}: " + "; ".join(p for p in problems if p))
    model.load_state_dict(tensors, strict=True)


def load_pruned(folder: str | os.PathLike, example_inputs: dict[str, Any] | None = None) -> nn.Module:
    """A pruned student (an instance of its pruned class) from either save format: the dense
    architecture is built from the config, the plan (checked first) cuts it down, the weights load
    strictly. A damaged folder is a ValueError naming the file and the entry."""
    folder = Path(folder)
    legacy = (folder / PLAN_FILE).exists()
    files = (LEGACY_WEIGHTS_FILE, CONFIG_FILE, PLAN_FILE) if legacy else (CONFIG_FILE, WEIGHTS_FILE)
    for name in files:
        if not (folder / name).is_file():
            raise ValueError(f"{str(folder)!r} is not a pruned-student folder: {name} is missing")
    config = read_json_object(folder / CONFIG_FILE)
    class_name = config.get("_class_name")
    if legacy:
        plan, plan_source, dense = read_json_object(folder / PLAN_FILE), str(folder / PLAN_FILE), class_name
        allowed = SUPPORTED_CLASSES
    else:
        plan, plan_source = config.get("pruning_plan"), f"{folder / CONFIG_FILE}: pruning_plan"
        dense, allowed = dense_of(str(class_name)), [PREFIX + c for c in SUPPORTED_CLASSES]
        if not isinstance(plan, dict):
            raise ValueError(f"{plan_source}: the plan must be an object, got {json_kind(plan)}")
    if dense not in SUPPORTED_CLASSES:
        raise ValueError(f"{folder / CONFIG_FILE}: _class_name={class_name!r} is not supported; "
                         f"allowed: {', '.join(allowed)}")
    check_plan(plan, plan_source)
    import diffusers

    dense_config = {k: v for k, v in config.items()
                    if not k.startswith("_") and k not in PRUNED_KEYS}
    model = getattr(diffusers, dense).from_config(dense_config).eval()
    apply_checked_plan(model, plan, plan_source, example_inputs)
    _load_weights(model, folder / (LEGACY_WEIGHTS_FILE if legacy else WEIGHTS_FILE), plan_source)
    return as_component(model, check_structure(model, config.get(STRUCTURE_KEY), str(folder / CONFIG_FILE)))


def load_pipeline(folder: str | os.PathLike, **kwargs: Any) -> Any:
    """A pipeline folder through diffusers' ``DiffusionPipeline.from_pretrained`` (safetensors), its
    pruned denoiser rebuilt by this package from the config and the weights, so the code file in
    its folder never runs and ``trust_remote_code`` is not needed; components saved as null (SD3
    without T5) are passed as None. ``kwargs`` go to ``from_pretrained``; its ``dtype`` (or
    ``torch_dtype``, a dtype or diffusers' per-component mapping) applies to the pruned denoiser too,
    which diffusers would leave as it was given."""
    import torch
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    pruned = {name: load_pruned(folder / name) for name in pipeline_components(folder)
              if name in DENOISERS and is_pruned_folder(folder / name)}
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    for name, model in pruned.items():
        wanted = dtype.get(name, dtype.get("default")) if isinstance(dtype, dict) else dtype
        if isinstance(wanted, torch.dtype):
            model.to(wanted)
    return DiffusionPipeline.from_pretrained(folder, use_safetensors=True, **pruned,
                                             **{**null_components(folder), **kwargs})


def save_model(model: nn.Module, folder: Path) -> None:
    if getattr(model, "pruning_plan", None) is not None:
        save_pruned(model, folder)
    else:
        save_diffusers_model(model, folder)
