"""Pruned students as diffusers model classes: ``PrunedUNet2DModel``, ``PrunedUNet2DConditionModel``
and ``PrunedDiTTransformer2DModel``.

Each subclasses its dense diffusers class and adds two config entries: ``pruning_plan`` (the
channels each group keeps, see pruning.plan) and ``pruned_structure`` (the attributes and tensor
shapes the plan changes, see portable.py). Its constructor builds the dense layout from the config,
applies the plan and checks the result against the structure, so diffusers' own
``from_pretrained`` rebuilds the pruned architecture and loads its safetensors weights;
``save_pretrained`` writes config and weights like any diffusers model. Nothing but JSON and
safetensors is read. The folders written here also carry portable.py as ``nni_2ndmatch.py``, the
class for diffusers alone (``trust_remote_code=True``); this package never runs it from a folder.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..compat import registered_config, restore_registered_config, retype
from ..files import atomic_dir, atomic_write_json, read_json_object
from ..models import SUPPORTED_CLASSES, diffusers_class_name, pipeline_denoiser
from ..models.pipelines import PIPELINE_INDEX
from . import portable
from .plan import apply_checked_plan, check_plan
from .portable import PRUNED_KEYS, STRUCTURE_KEY

PREFIX = "Pruned"
CODE_FILE = "nni_2ndmatch.py"  # model_index.json's library name + ".py": where diffusers looks for a component's code


def dense_of(class_name: str) -> str | None:
    """The dense class a pruned class name stands for (``PrunedUNet2DModel`` -> ``UNet2DModel``), else None."""
    dense = class_name.removeprefix(PREFIX)
    return dense if class_name.startswith(PREFIX) and dense in SUPPORTED_CLASSES else None


def _simple(value: Any) -> bool:
    """A module attribute that the structure records: a number, string, None, or a tuple/list of them."""
    if isinstance(value, (tuple, list)):
        return all(_simple(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _attributes(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and _simple(v)}


def pruned_structure(model: nn.Module) -> dict[str, Any]:
    """What the pruned ``model`` changes in the dense model its config describes (built on the meta
    device): the module attributes and the tensor shapes that differ. JSON; portable.py applies it."""
    import diffusers
    import torch

    config = {k: v for k, v in model.config.items() if not k.startswith("_") and k not in PRUNED_KEYS}
    with torch.device("meta"):
        dense = getattr(diffusers, diffusers_class_name(model)).from_config(config)
    ours, dense_modules = dict(model.named_modules()), dict(dense.named_modules())
    attributes = {}
    for name, module in ours.items():
        new, old = _attributes(module), _attributes(dense_modules[name])
        changed = {k: list(v) if isinstance(v, tuple) else v for k, v in new.items() if k not in old or old[k] != v}
        if changed:
            attributes[name] = changed
    dense_shapes = {n: t.shape for n, t in [*dense.named_parameters(), *dense.named_buffers()]}
    shapes = {n: list(t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]
              if t.shape != dense_shapes[n]}
    return {"attributes": attributes, "shapes": shapes}


def _init(self, pruning_plan: dict[str, Any] | None = None, pruned_structure: dict[str, Any] | None = None,
          auto_map: Any = None, **config: Any) -> None:
    type(self).__mro__[1].__init__(self, **config)  # the dense class: registers the dense config
    if pruning_plan is not None:
        where = f"{type(self).__name__} config: pruning_plan"
        check_plan(pruning_plan, where)
        apply_checked_plan(self, pruning_plan, where)
    self.pruning_plan = pruning_plan
    structure = check_structure(self, pruned_structure, f"{type(self).__name__} config") if pruning_plan else None
    self.register_to_config(pruning_plan=pruning_plan, pruned_structure=structure)


def _structure(model: nn.Module) -> dict[str, Any]:
    """The structure as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(pruned_structure(model)))


def check_structure(model: nn.Module, stored: Any, where: str) -> dict[str, Any]:
    """The model's structure (cut down by its plan), checked against a stored ``pruned_structure``
    (None: a folder written before it existed); a mismatch is a ValueError naming ``where``."""
    structure = _structure(model)
    if stored is not None and stored != structure:
        raise ValueError(f"{where}: {STRUCTURE_KEY} does not match what pruning_plan gives; the config was edited "
                         "or damaged")
    return structure


def _init_keys(input_class: type) -> set[str]:
    if dense_of(input_class.__name__):
        dense = input_class.__mro__[1]
        return set(inspect.signature(dense.__init__).parameters) | set(PRUNED_KEYS)
    return set(inspect.signature(input_class.__init__).parameters)


def _from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
    # The plan is applied to real tensors (no meta-device initialisation); weights only from safetensors.
    if kwargs.pop("use_safetensors", True) is False:
        raise ValueError(f"{cls.__name__} loads safetensors weights only; use_safetensors=False is not allowed")
    if kwargs.pop("device_map", None) is not None:
        raise ValueError(f"{cls.__name__} does not take a device_map; load it, then move it with .to(device)")
    kwargs["low_cpu_mem_usage"] = False  # (pipelines pass True by default)
    return super(cls, cls).from_pretrained(pretrained_model_name_or_path, use_safetensors=True, **kwargs)


@functools.cache
def pruned_class(dense_name: str) -> type:
    """The diffusers-loadable class of pruned ``dense_name`` models (one of SUPPORTED_CLASSES)."""
    if dense_name not in SUPPORTED_CLASSES:
        raise ValueError(f"{dense_name!r} has no pruned class; supported: {', '.join(SUPPORTED_CLASSES)}")
    import diffusers

    dense = getattr(diffusers, dense_name)
    name = PREFIX + dense_name
    cls = type(name, (dense,), {
        "__init__": _init, "_get_init_keys": staticmethod(_init_keys),
        "from_pretrained": classmethod(_from_pretrained), "__module__": "nni_2ndmatch", "_auto_class": "AutoModel",
        "__doc__": f"A pruned {dense_name}: its dense config plus ``pruning_plan`` (see {__name__})."})
    return cls


def as_component(student: nn.Module, structure: dict[str, Any] | None = None) -> nn.Module:
    """``student`` (a pruned diffusers model with its ``pruning_plan``) as an instance of its
    pruned class, in place: same modules and weights, the plan and the structure (computed when not
    given) in its config."""
    plan = getattr(student, "pruning_plan", None)
    if plan is None:
        raise ValueError("the model has no pruning_plan: it is not a pruned student")
    structure = structure if structure is not None else _structure(student)
    retype(student, pruned_class(diffusers_class_name(student)))
    student.register_to_config(pruning_plan=plan, pruned_structure=structure)
    return student


def save_as_component(student: nn.Module, folder: str | os.PathLike) -> type:
    """``save_pretrained`` (safetensors) of ``student`` into ``folder``: a pruned student as its
    pruned class (the plan and the structure in its config, portable.py beside it as CODE_FILE),
    another model as itself. ``student`` keeps its class and config. Returns the class written."""
    if getattr(student, "pruning_plan", None) is None:
        student.save_pretrained(folder, safe_serialization=True)
        return type(student)
    own_class, config = type(student), registered_config(student)
    try:
        component = as_component(student)
        component.save_pretrained(folder, safe_serialization=True)
        shutil.copyfile(portable.__file__, Path(folder) / CODE_FILE)
        return type(component)
    finally:
        retype(student, own_class)
        restore_registered_config(student, config)


#: Weight formats other than safetensors (pickles, other frameworks'), which a pipeline loaded as
#: load_pipeline loads it never reads.
OTHER_WEIGHTS = {"bin", "ckpt", "pt", "pth", "pkl", "pickle", "msgpack", "h5", "onnx", "pb", "ot", "gguf"}


def _read_when_loaded(path: Path) -> bool:
    """A file of a component folder that loading it reads: not hidden, not another format's
    weights (or their shard index), and safetensors weights only without a variant such as fp16
    (``model.safetensors``, ``model-00001-of-00002.safetensors`` and its index; not
    ``model.fp16.safetensors``)."""
    parts = path.name.split(".")
    if path.name.startswith(".") or OTHER_WEIGHTS & set(parts[1:]):
        return False
    return "safetensors" not in parts or parts[1:] in (["safetensors"], ["safetensors", "index", "json"])


def save_pipeline(student: nn.Module, source: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Write ``folder``: the pipeline folder ``source`` with ``student`` as its denoiser. Of the
    other components, the files that loading them reads are copied (no pickled or variant weights,
    nothing that model_index.json does not name but the license); a pruned student is saved as its
    pruned class (the plan in its config) and model_index.json names that class. Written
    atomically; ``student`` is unchanged."""
    source = Path(source)
    name = pipeline_denoiser(source)
    index = read_json_object(source / PIPELINE_INDEX)
    components = {k for k in index if not k.startswith("_") and k != name and (source / k).is_dir()}
    with atomic_dir(folder, marker=PIPELINE_INDEX) as tmp:
        for item in source.iterdir():
            if item.name in components:
                shutil.copytree(item, tmp / item.name,
                                ignore=lambda here, names: [n for n in names if not _read_when_loaded(Path(here, n))])
            elif item.is_file() and item.name.upper().startswith(("LICENSE", "LICENCE")):  # it travels with the weights
                shutil.copy2(item, tmp / item.name)
        saved = save_as_component(student, tmp / name)
        index[name] = [saved.__module__.split(".")[0], saved.__name__]
        atomic_write_json(tmp / PIPELINE_INDEX, index)
