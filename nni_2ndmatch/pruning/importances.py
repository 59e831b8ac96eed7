"""torch-pruning importances by name: ``magnitude``, and the gradient importances ``taylor`` and
``diff-pruning`` (Taylor scores of the denoising loss, summed over timesteps as in Diff-Pruning).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..data import collate
from ..method import default_scheduler, dsm_term, model_output, require_epsilon
from ..scoped import seeded_generator
from ..utils import requires_grad
from .surgery import GroupScorer

#: Clean samples (and their conditioning) the gradient importances see.
CALIBRATION_SIZE = 32


def calibration_items(data: Any, pruner: str, example_inputs: dict[str, Any]) -> list[dict[str, Tensor]]:
    """Up to CALIBRATION_SIZE clean samples as dicts ``{"sample", **conditioning}``, from a tensor
    [N, C, H, W] or a dataset (items: tensors, or such dicts). Conditioning the data lacks comes
    from ``example_inputs`` (its first sample)."""
    if data is None:
        raise ValueError(f"pruner={pruner!r} needs data: its importance uses gradients of the denoising loss "
                         "(pass data=a tensor of clean samples or a dataset)")
    n = min(len(data), CALIBRATION_SIZE)
    if n == 0:
        raise ValueError(f"pruner={pruner!r}: data is empty")
    items = [data[i] for i in range(n)]
    items = [dict(item) if isinstance(item, dict) else {"sample": item} for item in items]
    first = next(iter(example_inputs))
    for key, value in example_inputs.items():
        if key not in (first, "timestep") and key not in items[0] and isinstance(value, Tensor):
            for item in items:
                item[key] = value[0]
    return items


def denoising_gradients(teacher: nn.Module, pruner: str, data: Any, example_inputs: dict[str, Any], seed: int,
                         threshold: float, num_timesteps: int,
                         scheduler: Any = None) -> tuple[dict[str, Tensor], list[int]]:
    """Gradients of the denoising loss w.r.t. every parameter, by name (on a copy of the teacher),
    and the timesteps they were summed over (for ``taylor``: random, one per sample).

    ``taylor``: one batch of data at random timesteps. ``diff-pruning``: summed over timesteps
    0..T-1 (``num_timesteps`` evenly spaced, in that order) until the loss falls below
    ``threshold`` times the largest loss seen, as in Diff-Pruning (Fang et al., 2023).
    The data are noised by ``scheduler``, the teacher's training schedule (default: the reference
    DDPM one), which must predict the noise.
    """
    scheduler = scheduler if scheduler is not None else default_scheduler()
    require_epsilon(scheduler, f"pruner={pruner!r} scores channels by the gradients of the noise-prediction loss")
    x0, conditioning = collate(calibration_items(data, pruner, example_inputs), torch.device("cpu"))
    steps = int(scheduler.config.num_train_timesteps)
    g = seeded_generator(seed)
    work = copy.deepcopy(teacher).eval()

    def loss_at(t: Tensor) -> Tensor:
        noise = torch.randn(x0.shape, generator=g)
        x_t = scheduler.add_noise(x0, noise, t)
        return dsm_term(model_output(work, x_t, t.float(), **conditioning), noise)

    used: list[int] = []
    with requires_grad(work, True):
        if pruner == "taylor":
            t = torch.randint(0, steps, (x0.shape[0],), generator=g)
            loss_at(t).backward()
            used = t.tolist()
        else:
            largest = 0.0
            for t in torch.linspace(0, steps - 1, num_timesteps).round().long().tolist():
                loss = loss_at(torch.full((x0.shape[0],), t))
                value = float(loss.detach())
                largest = max(largest, value)
                if value < threshold * largest:
                    break
                loss.backward()
                used.append(t)
    return {name: p.grad for name, p in work.named_parameters() if p.grad is not None}, used


def taylor_scorer(gradients: dict[str, Tensor], sparse_ratio: float) -> GroupScorer:
    """First-order Taylor scores |w * dL/dw| (torch-pruning's group Taylor importance), from
    gradients computed on a copy of the model, looked up by parameter name."""
    import torch_pruning as tp

    importance = tp.importance.GroupTaylorImportance()

    def scorer(group, names: dict[nn.Module, str]) -> tuple[Tensor, float]:
        for dep, _ in group:
            module = dep.target.module
            for pname, p in module.named_parameters(recurse=False):
                if p.grad is None:
                    p.grad = gradients.get(f"{names[module]}.{pname}", torch.zeros_like(p)).clone()
        return importance(group), sparse_ratio

    return scorer
