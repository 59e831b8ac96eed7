"""The NNI integration, the only place that imports NNI (lazily, inside the functions that use it):
pruners by name (NNI's and torch-pruning's) with config_list checks, and 2ndMatch as an NNI
distiller."""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:  # the public names; at run time each is imported on first use (nni_2ndmatch.lazy)
    from .config_list import check_config_list, check_config_list_model, config_list_problems, default_config_list
    from .distiller import NoisyBatches, SecondMatchDistiller, diffusion_evaluator, distiller_class, dsm_training_step
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

__getattr__, __dir__, __all__ = lazy_exports(__name__)
