"""Pruning surgery (scores -> a physically smaller diffusers model), the torch-pruning importances,
and the pruned student's save format. Pruners by name, NNI's included: ``nni_2ndmatch.nni``."""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:  # the public names; at run time each is imported on first use (nni_2ndmatch.lazy)
    from ..models import default_example_inputs
    from .component import as_component, pruned_class, save_pipeline
    from .importances import calibration_items, denoising_gradients, taylor_scorer
    from .plan import check_plan
    from .storage import (
        PLAN_FILE,
        is_pruned_folder,
        load_model_folder,
        load_pipeline,
        load_pruned,
        save_model,
        save_pruned,
    )
    from .surgery import OUTPUT_LAYERS, apply_plan, macs_params, magnitude_scores, masks_to_student, prune_with_scores

__getattr__, __dir__, __all__ = lazy_exports(__name__)
