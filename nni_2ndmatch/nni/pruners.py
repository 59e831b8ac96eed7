"""Pruners by name, NNI's or torch-pruning's: the front door from a pruner name to a physically
smaller student (``prune_diffusers``). NNI's pruners decide through their channel masks.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..models import default_example_inputs
from ..pruning import (
    TP_IMPORTANCES,
    calibration_items,
    denoising_gradients,
    magnitude_scores,
    masks_to_student,
    prune_with_scores,
    taylor_scorer,
)
from ..pruning.surgery import check_ratio
from ..utils import is_integer, requires_grad
from .config_list import (
    check_config_list,
    check_config_list_model,
    default_config_list,
    float_thresholds,
)
from .distiller import NoisyBatches, diffusion_evaluator

#: NNI pruner classes accepted by name (TaylorPruner gets an evaluator built from ``data``).
NNI_PRUNERS = ("L1NormPruner", "L2NormPruner", "FPGMPruner", "TaylorPruner")
#: Every pruner name ``prune_diffusers`` takes.
PRUNERS = TP_IMPORTANCES + NNI_PRUNERS


def nni_masks(model: nn.Module, pruner: str, config_list: list[dict[str, Any]],
              data: Any = None, seed: int = 0) -> dict[str, dict[str, Tensor]]:
    """Masks from an NNI pruner named by its class (run on a copy; the model is not modified).

    TaylorPruner scores channels by |weight * gradient| of the denoising loss on ``data``; its
    evaluator's optimizer has lr=0, so the weights it scores are the model's own.
    """
    import nni.compression.pruning as nni_pruning

    allowed = ", ".join(NNI_PRUNERS + TP_IMPORTANCES)
    cls = getattr(nni_pruning, pruner, None)
    if not isinstance(cls, type):
        raise ValueError(f"pruner={pruner!r} is not an NNI pruner class; allowed here: {allowed}")
    if pruner not in NNI_PRUNERS:
        raise ValueError(f"pruner={pruner!r} is not supported by name; run it yourself and pass its channel masks "
                         f"to masks_to_student (allowed here: {allowed})")
    work = copy.deepcopy(model)
    if pruner == "TaylorPruner":
        import nni
        from torch.utils.data import DataLoader

        items = calibration_items(data, pruner, default_example_inputs(model))
        loader = DataLoader(items, batch_size=len(items), collate_fn=NoisyBatches(seed=seed))
        optimizer = nni.trace(torch.optim.SGD)(work.parameters(), lr=0.0)
        with requires_grad(work, True):
            nni_pruner = cls(work, config_list, diffusion_evaluator(work, loader, optimizer=optimizer, progress=False),
                             training_steps=1)
            _, masks = nni_pruner.compress(None, None)  # it runs training_steps steps itself
    else:
        nni_pruner = cls(work, config_list)
        _, masks = nni_pruner.compress()
    nni_pruner.unwrap_model()
    return masks


def check_config_list_pruner(pruner: str, config_list: Any) -> None:
    """A config_list goes with an NNI pruner only: the torch-pruning importances would ignore it."""
    if config_list is not None and pruner in TP_IMPORTANCES:
        raise ValueError(f"config_list is for the NNI pruners ({', '.join(NNI_PRUNERS)}); pruner={pruner!r} "
                         "(a torch-pruning importance) would ignore it: leave config_list out or pick an NNI pruner")


def _check_config_list_use(pruner: str, config_list: Any, model: nn.Module) -> None:
    check_config_list_pruner(pruner, config_list)
    if config_list is None:
        return
    check_config_list(config_list)
    check_config_list_model(config_list, model)


def prune_diffusers(teacher: nn.Module, pruner: str = "magnitude", sparse_ratio: float = 0.3, *,
                    example_inputs: dict[str, Any] | None = None, data: Any = None, round_to: int | None = 8,
                    config_list: list[dict[str, Any]] | None = None, seed: int = 0,
                    diff_threshold: float = 0.05, diff_timesteps: int = 20) -> tuple[nn.Module, dict[str, Any]]:
    """Prune a diffusers model into a physically smaller student; the teacher is not modified.

    ``pruner``: a torch-pruning importance (``magnitude``, ``taylor``, ``diff-pruning``) or an NNI
    pruner class name (L1NormPruner, L2NormPruner, FPGMPruner, TaylorPruner), which gets
    ``config_list`` (default: every Conv2d and Linear at ``sparse_ratio``, output layers excluded;
    a given one replaces ``sparse_ratio`` and is checked against the model first).
    ``data`` (clean samples: a tensor or a dataset) is needed by the gradient importances only;
    ``diff_threshold`` and ``diff_timesteps`` tune ``diff-pruning`` (see ``denoising_gradients``).
    ``example_inputs``: the model's forward arguments for tracing (default: ``default_example_inputs``).
    Deterministic for a ``seed``. The report records what was asked: ``pruner``, ``sparse_ratio``
    (None when a ``config_list`` decides) and ``config_list`` (None when not given).
    """
    check_ratio(sparse_ratio)
    if example_inputs is None:
        example_inputs = default_example_inputs(teacher)
    if not 0 <= diff_threshold < 1:
        raise ValueError(f"diff_threshold={diff_threshold!r} is not allowed; it must be in [0, 1)")
    if not is_integer(diff_timesteps) or diff_timesteps < 1:
        raise ValueError(f"diff_timesteps={diff_timesteps!r} is not allowed; it must be an integer >= 1")
    _check_config_list_use(pruner, config_list, teacher)
    student, report = _run_pruner(teacher, pruner, sparse_ratio, example_inputs, data, round_to, config_list, seed,
                                  diff_threshold, diff_timesteps)
    report.update(pruner=pruner, sparse_ratio=None if config_list is not None else sparse_ratio,
                  config_list=copy.deepcopy(config_list))
    return student, report


def _run_pruner(teacher: nn.Module, pruner: str, sparse_ratio: float, example_inputs: dict[str, Any], data: Any,
                round_to: int | None, config_list: list[dict[str, Any]] | None, seed: int, diff_threshold: float,
                diff_timesteps: int) -> tuple[nn.Module, dict[str, Any]]:
    if pruner == "magnitude":
        return prune_with_scores(teacher, lambda group, names: (magnitude_scores(group), sparse_ratio),
                                 example_inputs, round_to)
    if pruner in ("taylor", "diff-pruning"):
        gradients, timesteps = denoising_gradients(teacher, pruner, data, example_inputs, seed, diff_threshold,
                                                    diff_timesteps)
        student, report = prune_with_scores(teacher, taylor_scorer(gradients, sparse_ratio), example_inputs, round_to)
        report["calibration_timesteps"] = timesteps
        return student, report
    nni_config = (float_thresholds(config_list) if config_list is not None
                  else default_config_list(teacher, sparse_ratio))
    masks = nni_masks(teacher, pruner, nni_config, data, seed)
    return masks_to_student(teacher, masks, example_inputs, round_to)
