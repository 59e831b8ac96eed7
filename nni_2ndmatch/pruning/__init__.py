"""Pruning surgery (scores -> a physically smaller diffusers model), the torch-pruning importances,
and the pruned student's save format. Pruners by name, NNI's included: ``nni_2ndmatch.nni``."""

from ..models import default_example_inputs
from .component import as_component, pruned_class, save_pipeline
from .importances import (
    calibration_items,
    denoising_gradients,
    taylor_scorer,
)
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
from .surgery import (
    OUTPUT_LAYERS,
    apply_plan,
    macs_params,
    magnitude_scores,
    masks_to_student,
    prune_with_scores,
)

__all__ = [
    "OUTPUT_LAYERS", "PLAN_FILE", "apply_plan", "as_component", "calibration_items", "check_plan",
    "default_example_inputs", "denoising_gradients", "is_pruned_folder", "load_model_folder", "load_pipeline",
    "load_pruned", "macs_params", "magnitude_scores", "masks_to_student", "prune_with_scores", "pruned_class",
    "save_model", "save_pipeline", "save_pruned", "taylor_scorer",
]
