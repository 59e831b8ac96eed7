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
    default_example_inputs,
    load_diffusers_model,
    save_diffusers_model,
)
from ..utils import did_you_mean, is_integer, json_kind
from .surgery import PLAN_VERSION, apply_plan, dependency_graph, out_width

WEIGHTS_FILE, CONFIG_FILE, PLAN_FILE = "model.safetensors", "config.json", "pruning_plan.json"


def save_pruned(student: nn.Module, folder: str | os.PathLike) -> None:
    """Write a pruned student: safetensors weights, the DENSE model's diffusers config (config.json)
    and the pruning plan (JSON: the channels each group keeps). Written atomically."""
    plan = getattr(student, "pruning_plan", None)
    if plan is None:
        raise ValueError("the model has no pruning_plan; save it with save_pretrained instead")
    config = dict(student.config)
    config["_class_name"] = type(student).__name__
    with atomic_dir(folder) as tmp:
        save_tensors(tmp / WEIGHTS_FILE, student.state_dict())
        atomic_write_json(tmp / CONFIG_FILE, json.loads(json.dumps(config, default=list)))
        atomic_write_json(tmp / PLAN_FILE, plan)


def is_pruned_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / PLAN_FILE).is_file()


def load_model_folder(folder: str | os.PathLike) -> nn.Module:
    """A pruned-student folder or a diffusers model folder, told apart by the pruning plan file."""
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


def _check_keys(value: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")
    missing = [k for k in allowed if k not in value]
    if missing:
        raise ValueError(f"{where}: required key {missing[0]!r} is missing")


def _check_keep(keep: Any, where: str) -> None:
    """A group's ``keep``: a non-empty list of distinct integer channel indices."""
    if not isinstance(keep, list):
        raise ValueError(f"{where}: expected a list of channel indices, got {json_kind(keep)}")
    if not keep:
        raise ValueError(f"{where}: keeps no channel; at least one index is needed")
    seen: set[int] = set()
    for i, index in enumerate(keep):
        if not is_integer(index):
            raise ValueError(f"{where}[{i}]: value {index!r} is not allowed: a channel index is an integer, "
                             f"got {json_kind(index)}")
        if index in seen:
            raise ValueError(f"{where}: index {index} is listed twice; each channel may be kept once")
        seen.add(index)


def check_plan(plan: dict[str, Any], path: str | os.PathLike) -> None:
    """The structure of a pruning plan (keys, types, distinct indices): checked before any model is built."""
    _check_keys(plan, ("groups", "version"), str(path))
    if plan["version"] != PLAN_VERSION:
        raise ValueError(f"{path}: version={plan['version']!r} is not supported; allowed: {PLAN_VERSION}")
    groups = plan["groups"]
    if not isinstance(groups, list):
        raise ValueError(f"{path}: groups: expected a list of objects, got {json_kind(groups)}")
    roots: set[str] = set()
    for i, group in enumerate(groups):
        where = f"{path}: groups[{i}]"
        if not isinstance(group, dict):
            raise ValueError(f"{where}: expected an object with 'root' and 'keep', got {json_kind(group)}")
        _check_keys(group, ("keep", "root"), where)
        root = group["root"]
        if not isinstance(root, str) or not root:
            raise ValueError(f"{where}.root: value {root!r} is not allowed: it must be a layer name (a string)")
        if root in roots:
            raise ValueError(f"{where}.root: layer {root!r} has two groups; each layer may have one")
        roots.add(root)
        _check_keep(group["keep"], f"{where}.keep")


def check_plan_widths(plan: dict[str, Any], model: nn.Module, path: str | os.PathLike) -> None:
    """Every group's root is a Conv2d/Linear of the dense ``model`` and keeps indices within its width."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for i, group in enumerate(plan["groups"]):
        where, root, keep = f"{path}: groups[{i}]", group["root"], group["keep"]
        if root not in layers:
            hint = did_you_mean(root, list(layers), n=3)
            raise ValueError(f"{where}.root: {root!r} does not match the {type(model).__name__} architecture: "
                             f"it is not a Conv2d or Linear layer there{hint}")
        width = out_width(layers[root])
        if len(keep) > width:
            raise ValueError(f"{where}.keep: {len(keep)} indices are too many for width {width} ({root})")
        bad = next((k for k in keep if not 0 <= k < width), None)
        if bad is not None:
            raise ValueError(f"{where}.keep: index {bad} is out of range for width {width} ({root}); "
                             f"allowed: 0 to {width - 1}")


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
    check_plan_widths(plan, model, folder / PLAN_FILE)
    inputs = example_inputs if example_inputs is not None else default_example_inputs(model)
    try:
        apply_plan(model, dependency_graph(model, inputs), plan["groups"])
    except (KeyError, AttributeError, IndexError, RuntimeError) as e:
        raise ValueError(f"{folder / PLAN_FILE} does not match the {class_name} architecture: {e}") from None
    model.pruning_plan = plan
    _load_weights(model, folder / WEIGHTS_FILE)
    return model


def save_model(model: nn.Module, folder: Path) -> None:
    if getattr(model, "pruning_plan", None) is not None:
        save_pruned(model, folder)
    else:
        save_diffusers_model(model, folder)
