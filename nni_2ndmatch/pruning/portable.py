"""Pruned students for diffusers alone: this file imports torch and diffusers only.

Every pruned student folder that nni-2ndmatch writes carries a copy of this file as
``nni_2ndmatch.py`` (diffusers' custom components), so that where the package is not installed

    AutoModel.from_pretrained("OUT/student", trust_remote_code=True)
    DiffusionPipeline.from_pretrained("OUT/pipeline", trust_remote_code=True)

rebuild the student. The config holds, besides the dense model's own entries, ``pruned_structure``:
the module attributes and tensor shapes in which the pruned model differs from the dense model the
config describes. The class builds that dense model, sets those attributes, gives those tensors
their shapes, and diffusers loads the safetensors weights into it. (``pruning_plan``, the channels
each layer group kept, is carried along as a record; nni-2ndmatch itself rebuilds students from the
plan and checks the structure against it, and never runs this file from a model folder.)
"""

from __future__ import annotations

import inspect

import diffusers
import torch
from torch import nn

STRUCTURE_KEY, PLAN_KEY = "pruned_structure", "pruning_plan"
#: The config entries a pruned class adds to its dense class's (auto_map: diffusers' pointer to this
#: file, written again on save from ``_auto_class``).
PRUNED_KEYS = (STRUCTURE_KEY, PLAN_KEY, "auto_map")


def apply_structure(model: nn.Module, structure: dict) -> None:
    """Cut the dense ``model`` down, in place, to ``structure`` ({"attributes": {module: {name:
    value}}, "shapes": {tensor: shape}}); the new tensors are uninitialised until weights load."""
    if not isinstance(structure, dict) or set(structure) != {"attributes", "shapes"}:
        raise ValueError(f"config: {STRUCTURE_KEY} must be an object with 'attributes' and 'shapes'")
    modules = dict(model.named_modules())
    for name, attributes in structure["attributes"].items():
        if name not in modules:
            raise ValueError(f"config: {STRUCTURE_KEY}: no module {name!r} in {type(model).__name__}")
        for key, value in attributes.items():
            old = getattr(modules[name], key, None)
            setattr(modules[name], key, tuple(value) if isinstance(old, tuple) else value)
    for name, shape in structure["shapes"].items():
        owner, _, leaf = name.rpartition(".")
        old = getattr(modules.get(owner), leaf, None)
        if not isinstance(old, torch.Tensor):
            raise ValueError(f"config: {STRUCTURE_KEY}: no tensor {name!r} in {type(model).__name__}")
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        setattr(modules[owner], leaf, nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new)


def _pruned(dense: type) -> type:
    def __init__(self, pruned_structure: dict | None = None, pruning_plan: dict | None = None,
                 auto_map: dict | None = None, **config) -> None:
        dense.__init__(self, **config)  # registers the dense config
        if pruned_structure is None:
            raise ValueError(f"config: {STRUCTURE_KEY} is missing; it is not a pruned {dense.__name__} folder")
        apply_structure(self, pruned_structure)
        self.register_to_config(pruned_structure=pruned_structure, pruning_plan=pruning_plan)

    def _get_init_keys(input_class: type) -> set:
        if input_class.__name__ == "Pruned" + dense.__name__:
            return set(inspect.signature(dense.__init__).parameters) | set(PRUNED_KEYS)
        return set(inspect.signature(input_class.__init__).parameters)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        if kwargs.pop("use_safetensors", True) is False:
            raise ValueError(f"{cls.__name__} loads safetensors weights only; use_safetensors=False is not allowed")
        if kwargs.pop("device_map", None) is not None:
            raise ValueError(f"{cls.__name__} does not take a device_map; load it, then move it with .to(device)")
        kwargs["low_cpu_mem_usage"] = False  # the structure is applied to real tensors, not meta ones
        return super(cls, cls).from_pretrained(pretrained_model_name_or_path, use_safetensors=True, **kwargs)

    return type("Pruned" + dense.__name__, (dense,), {
        "__init__": __init__, "_get_init_keys": staticmethod(_get_init_keys), "from_pretrained": from_pretrained,
        "_auto_class": "AutoModel", "__module__": __name__,
        "__doc__": f"A pruned {dense.__name__}: its dense config plus {STRUCTURE_KEY} (see this file)."})


PrunedUNet2DModel = _pruned(diffusers.UNet2DModel)
PrunedUNet2DConditionModel = _pruned(diffusers.UNet2DConditionModel)
PrunedDiTTransformer2DModel = _pruned(diffusers.DiTTransformer2DModel)
PrunedSD3Transformer2DModel = _pruned(diffusers.SD3Transformer2DModel)
