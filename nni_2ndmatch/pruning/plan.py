"""A pruning plan (the channels each layer group keeps, JSON): its structure, checked before any
model is built, and its widths, checked against the dense model."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..models import default_example_inputs, diffusers_class_name
from ..utils import did_you_mean, is_integer, json_kind
from .surgery import PLAN_VERSION, apply_plan, dependency_graph, out_width


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


def apply_checked_plan(model: nn.Module, plan: dict[str, Any], path: str | os.PathLike,
                       example_inputs: dict[str, Any] | None = None) -> None:
    """Cut the dense ``model`` down to ``plan`` (structure checked by :func:`check_plan`) in place,
    after checking its widths; a plan that does not fit the architecture is a ValueError naming ``path``."""
    check_plan_widths(plan, model, path)
    inputs = example_inputs if example_inputs is not None else default_example_inputs(model)
    try:
        apply_plan(model, dependency_graph(model, inputs), plan["groups"])
    except (KeyError, AttributeError, IndexError, RuntimeError) as e:
        raise ValueError(f"{path} does not match the {diffusers_class_name(model)} architecture: {e}") from None
    model.pruning_plan = plan
