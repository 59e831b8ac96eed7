"""Checkpoints of the finetuning loop: ``checkpoints/step-NNNNNNN/{state.safetensors,state.json}``
plus a ``latest`` pointer, written atomically; optimizer state without pickles.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..files import atomic_dir, atomic_write_json, atomic_write_text, save_tensors
from ..layout import CHECKPOINT_META, CHECKPOINT_TENSORS


class Checkpoints:
    """``checkpoints/step-NNNNNNN/{state.safetensors,state.json}`` plus a ``latest`` pointer file."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root, self.keep = root, keep

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / CHECKPOINT_META).is_file() else None

    def save(self, step: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        name = f"step-{step:07d}"
        with atomic_dir(self.root / name) as tmp:
            save_tensors(tmp / CHECKPOINT_TENSORS, tensors)
            atomic_write_json(tmp / CHECKPOINT_META, meta)
        atomic_write_text(self.root / "latest", name + "\n")
        for old in sorted(self.root.glob("step-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
