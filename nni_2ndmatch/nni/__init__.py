"""The NNI integration, the only place that imports NNI (lazily, inside the functions that use it):
pruners by name (NNI's and torch-pruning's) with config_list checks, and 2ndMatch as an NNI
distiller."""

from .config_list import (
    check_config_list,
    check_config_list_model,
    config_list_problems,
    default_config_list,
)
from .distiller import (
    NoisyBatches,
    diffusion_evaluator,
    distiller_class,
    dsm_training_step,
)
from .pruners import (
    NNI_PRUNERS,
    PRUNER_REGISTRY,
    PRUNERS,
    PruneRequest,
    PrunerSpec,
    check_config_list_pruner,
    nni_masks,
    prune_diffusers,
    pruner_spec,
    register_pruner,
)

__all__ = [
    "NNI_PRUNERS", "NoisyBatches", "PRUNERS", "PRUNER_REGISTRY", "PruneRequest", "PrunerSpec", "check_config_list",
    "check_config_list_model", "check_config_list_pruner", "config_list_problems", "default_config_list",
    "diffusion_evaluator", "distiller_class", "dsm_training_step", "nni_masks", "prune_diffusers", "pruner_spec",
    "register_pruner",
]


def __getattr__(name: str):
    if name == "SecondMatchDistiller":  # built on first use: it subclasses an NNI class
        return distiller_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
