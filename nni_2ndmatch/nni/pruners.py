"""Pruners by name, NNI's or torch-pruning's: the front door from a pruner name to a physically
smaller student (``prune_diffusers``). NNI's pruners decide through their channel masks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..models import default_example_inputs
from ..pruning import (
    calibration_items,
    denoising_gradients,
    magnitude_scores,
    masks_to_student,
    prune_with_scores,
    taylor_scorer,
)
from ..pruning.surgery import check_ratio
from ..utils import add_unique, is_integer, requires_grad
from .config_list import (
    check_config_list,
    check_config_list_model,
    default_config_list,
    float_thresholds,
)
from .distiller import NoisyBatches, diffusion_evaluator


@dataclass(frozen=True)
class PruneRequest:
    """What a pruner is asked: the model, the ratio (or NNI ``config_list``), the inputs it is traced
    on, the calibration data of the gradient pruners, the rounding of kept channels, a seed."""

    teacher: nn.Module
    sparse_ratio: float
    example_inputs: dict[str, Any]
    data: Any
    round_to: int | None
    config_list: list[dict[str, Any]] | None
    seed: int
    diff_threshold: float
    diff_timesteps: int
    scheduler: Any = None  # the training schedule the gradient pruners noise the data with; None: the reference


@dataclass(frozen=True)
class PrunerSpec:
    """A pruner by name: how it runs, and what it needs. ``needs_gradients``: it scores channels
    by gradients of the noise-prediction loss (it needs data, and a model that predicts the noise);
    ``nni``: an NNI pruner class, which takes a ``config_list``."""

    name: str
    run: Callable[[PruneRequest], tuple[nn.Module, dict[str, Any]]]
    needs_gradients: bool = False
    nni: bool = False


PRUNER_REGISTRY: dict[str, PrunerSpec] = {}


def register_pruner(spec: PrunerSpec) -> PrunerSpec:
    """Add a pruner by name (a duplicate name is an error); the config's ``pruning.pruner`` takes it."""
    return add_unique(PRUNER_REGISTRY, spec.name, spec, "pruner")


def pruner_spec(name: str) -> PrunerSpec:
    """The registered pruner ``name``; else a ValueError listing those there are (an NNI pruner
    class that is not registered: how to use it anyway)."""
    if name in PRUNER_REGISTRY:
        return PRUNER_REGISTRY[name]
    allowed = ", ".join(PRUNER_REGISTRY)
    if isinstance(name, str) and name.endswith("Pruner"):
        import nni.compression.pruning as nni_pruning

        if isinstance(getattr(nni_pruning, name, None), type):
            raise _not_by_name(name)
    raise ValueError(f"pruner={name!r} is unknown; allowed: {allowed}")


def _not_by_name(name: str) -> ValueError:
    """An NNI pruner class that is not registered: how to use it anyway."""
    return ValueError(f"pruner={name!r} is not supported by name; run it yourself and pass its channel masks "
                      f"to masks_to_student (allowed here: {', '.join(PRUNER_REGISTRY)})")


def _magnitude(r: PruneRequest) -> tuple[nn.Module, dict[str, Any]]:
    return prune_with_scores(r.teacher, lambda group, names: (magnitude_scores(group), r.sparse_ratio),
                             r.example_inputs, r.round_to)


def _gradient_pruner(name: str) -> Callable[[PruneRequest], tuple[nn.Module, dict[str, Any]]]:
    def run(r: PruneRequest) -> tuple[nn.Module, dict[str, Any]]:
        gradients, timesteps = denoising_gradients(r.teacher, name, r.data, r.example_inputs, r.seed,
                                                    r.diff_threshold, r.diff_timesteps, r.scheduler)
        student, report = prune_with_scores(r.teacher, taylor_scorer(gradients, r.sparse_ratio), r.example_inputs,
                                            r.round_to)
        report["calibration_timesteps"] = timesteps
        return student, report
    return run


def _nni_pruner(name: str) -> Callable[[PruneRequest], tuple[nn.Module, dict[str, Any]]]:
    def run(r: PruneRequest) -> tuple[nn.Module, dict[str, Any]]:
        config_list = (float_thresholds(r.config_list) if r.config_list is not None
                       else default_config_list(r.teacher, r.sparse_ratio))
        masks = nni_masks(r.teacher, name, config_list, r.data, r.seed, r.scheduler)
        return masks_to_student(r.teacher, masks, r.example_inputs, r.round_to)
    return run


for _spec in (PrunerSpec("magnitude", _magnitude),
              PrunerSpec("taylor", _gradient_pruner("taylor"), needs_gradients=True),
              PrunerSpec("diff-pruning", _gradient_pruner("diff-pruning"), needs_gradients=True),
              PrunerSpec("L1NormPruner", _nni_pruner("L1NormPruner"), nni=True),
              PrunerSpec("L2NormPruner", _nni_pruner("L2NormPruner"), nni=True),
              PrunerSpec("FPGMPruner", _nni_pruner("FPGMPruner"), nni=True),
              # TaylorPruner gets an evaluator built from ``data``
              PrunerSpec("TaylorPruner", _nni_pruner("TaylorPruner"), needs_gradients=True, nni=True)):
    register_pruner(_spec)

#: The built-in NNI pruner classes accepted by name (the registry also holds any registered later).
NNI_PRUNERS = tuple(name for name, spec in PRUNER_REGISTRY.items() if spec.nni)
#: The built-in pruner names ``prune_diffusers`` takes (and any registered later: ``PRUNER_REGISTRY``).
PRUNERS = tuple(PRUNER_REGISTRY)


def nni_masks(model: nn.Module, pruner: str, config_list: list[dict[str, Any]],
              data: Any = None, seed: int = 0, scheduler: Any = None) -> dict[str, dict[str, Tensor]]:
    """Masks from an NNI pruner named by its class (run on a copy; the model is not modified).

    TaylorPruner scores channels by |weight * gradient| of the denoising loss on ``data``; its
    evaluator's optimizer has lr=0, so the weights it scores are the model's own; ``data`` is
    noised by ``scheduler`` (default: the reference DDPM schedule).
    """
    import nni.compression.pruning as nni_pruning

    allowed = ", ".join(PRUNER_REGISTRY)
    cls = getattr(nni_pruning, pruner, None)
    if not isinstance(cls, type):
        raise ValueError(f"pruner={pruner!r} is not an NNI pruner class; allowed here: {allowed}")
    spec = PRUNER_REGISTRY.get(pruner)
    if spec is None or not spec.nni:
        raise _not_by_name(pruner)
    work = copy.deepcopy(model)
    if spec.needs_gradients:
        import nni
        from torch.utils.data import DataLoader

        items = calibration_items(data, pruner, default_example_inputs(model))
        loader = DataLoader(items, batch_size=len(items), collate_fn=NoisyBatches(scheduler, seed=seed))
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
    if config_list is not None and not pruner_spec(pruner).nni:
        nni_pruners = ", ".join(name for name, spec in PRUNER_REGISTRY.items() if spec.nni)  # registered ones too
        raise ValueError(f"config_list is for the NNI pruners ({nni_pruners}); pruner={pruner!r} "
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
                    diff_threshold: float = 0.05, diff_timesteps: int = 20,
                    scheduler: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """Prune a diffusers model into a physically smaller student; the teacher is not modified.

    ``pruner``: a torch-pruning importance (``magnitude``, ``taylor``, ``diff-pruning``) or an NNI
    pruner class name (L1NormPruner, L2NormPruner, FPGMPruner, TaylorPruner), which gets
    ``config_list`` (default: every Conv2d and Linear at ``sparse_ratio``, output layers excluded;
    a given one replaces ``sparse_ratio`` and is checked against the model first).
    ``data`` (clean samples: a tensor or a dataset) is needed by the gradient importances only;
    ``diff_threshold`` and ``diff_timesteps`` tune ``diff-pruning`` (see ``denoising_gradients``);
    ``scheduler``: the teacher's training schedule, by which the gradient pruners noise ``data``
    (default: the reference DDPM one; a pipeline's own, as a job passes it, for a pipeline's denoiser).
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
    spec = pruner_spec(pruner)
    _check_config_list_use(pruner, config_list, teacher)
    student, report = spec.run(PruneRequest(teacher, sparse_ratio, example_inputs, data, round_to, config_list, seed,
                                            diff_threshold, diff_timesteps, scheduler))
    report.update(pruner=pruner, sparse_ratio=None if config_list is not None else sparse_ratio,
                  config_list=copy.deepcopy(config_list))
    return student, report
