"""The save format of a pruned student: safetensors weights, the dense model's diffusers config and
the pruning plan (JSON). Never a pickle; a damaged folder is a clear error naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..files import atomic_dir, atomic_write_json, load_tensors, save_tensors
from ..models import (
    SUPPORTED_CLASSES,
    diffusers_class_name,
    is_pipeline_folder,
    load_diffusers_model,
    pipeline_denoiser,
    save_diffusers_model,
)
from ..utils import json_kind
from .component import PREFIX, dense_of, pruned_class
from .plan import apply_checked_plan, check_plan

WEIGHTS_FILE, CONFIG_FILE, PLAN_FILE = "model.safetensors", "config.json", "pruning_plan.json"


def save_pruned(student: nn.Module, folder: str | os.PathLike) -> None:
    """Write a pruned student: safetensors weights, the DENSE model's diffusers config (config.json)
    and the pruning plan (JSON: the channels each group keeps). Written atomically."""
    plan = getattr(student, "pruning_plan", None)
    if plan is None:
        raise ValueError("the model has no pruning_plan; save it with save_pretrained instead")
    config = dict(student.config)
    config["_class_name"] = diffusers_class_name(student)
    config.pop("pruning_plan", None)  # a pruned class's config entry: the plan has its own file
    with atomic_dir(folder) as tmp:
        save_tensors(tmp / WEIGHTS_FILE, student.state_dict())
        atomic_write_json(tmp / CONFIG_FILE, json.loads(json.dumps(config, default=list)))
        atomic_write_json(tmp / PLAN_FILE, plan)


def _pruned_class_name(folder: Path) -> str | None:
    """The class of a folder written by a pruned class's ``save_pretrained`` (e.g. PrunedUNet2DModel)."""
    try:
        name = json.loads((folder / CONFIG_FILE).read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name.startswith(PREFIX) else None


def is_pruned_folder(folder: str | os.PathLike) -> bool:
    """A pruned student: the plan file beside a dense config, or a pruned class's save_pretrained."""
    return (Path(folder) / PLAN_FILE).is_file() or _pruned_class_name(Path(folder)) is not None


def load_model_folder(folder: str | os.PathLike) -> nn.Module:
    """A pruned-student folder, a diffusers model folder, or a pixel-space pipeline folder (its
    denoiser; see ``pipeline_denoiser``)."""
    if is_pipeline_folder(folder):
        folder = Path(folder) / pipeline_denoiser(folder)
    if is_pruned_folder(folder):
        return load_pruned(folder)

    return load_diffusers_model(folder)


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; malformed JSON or another top-level value is a ValueError naming it."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the top level must be an object, got {json_kind(value)}")
    return value


def _load_weights(model: nn.Module, path: Path) -> None:
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
        raise ValueError(f"{path} does not match {path.parent / PLAN_FILE}: "
                         + "; ".join(p for p in problems if p))
    model.load_state_dict(tensors, strict=True)


def load_pruned(folder: str | os.PathLike, example_inputs: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild the dense architecture from its config, apply the plan, load the weights (strict).
    The plan is checked first (a damaged folder is a ValueError naming the file and the entry)."""
    folder = Path(folder)
    class_name = _pruned_class_name(folder) if not (folder / PLAN_FILE).exists() else None
    if class_name is not None:  # written by save_pretrained of a pruned class: the plan is in its config
        dense = dense_of(class_name)
        if dense is None:
            raise ValueError(f"{folder / CONFIG_FILE}: _class_name={class_name!r} is not supported; allowed: "
                             f"{', '.join(PREFIX + c for c in SUPPORTED_CLASSES)}")
        return pruned_class(dense).from_pretrained(str(folder), use_safetensors=True).eval()
    for name in (WEIGHTS_FILE, CONFIG_FILE, PLAN_FILE):
        if not (folder / name).is_file():
            raise ValueError(f"{str(folder)!r} is not a pruned-student folder: {name} is missing")
    config = _read_json_object(folder / CONFIG_FILE)
    plan = _read_json_object(folder / PLAN_FILE)
    class_name = config.get("_class_name")
    if class_name not in SUPPORTED_CLASSES:
        raise ValueError(f"{folder / CONFIG_FILE}: _class_name={class_name!r} is not supported; "
                         f"allowed: {', '.join(SUPPORTED_CLASSES)}")
    check_plan(plan, folder / PLAN_FILE)
    import diffusers

    cls = getattr(diffusers, class_name)
    model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")}).eval()
    apply_checked_plan(model, plan, folder / PLAN_FILE, example_inputs)
    _load_weights(model, folder / WEIGHTS_FILE)
    return model


def save_model(model: nn.Module, folder: Path) -> None:
    if getattr(model, "pruning_plan", None) is not None:
        save_pruned(model, folder)
    else:
        save_diffusers_model(model, folder)
