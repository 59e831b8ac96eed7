"""Pruning surgery (scores -> a physically smaller diffusers model), the torch-pruning importances,
and the pruned student's save format. Pruners by name, NNI's included: ``nni_2ndmatch.nni``."""

from ..lazy import lazy_exports

_EXPORTS = {
    "default_example_inputs": "..models",
    **dict.fromkeys(["as_component", "pruned_class", "save_pipeline"], ".component"),
    **dict.fromkeys(["calibration_items", "denoising_gradients", "taylor_scorer"], ".importances"),
    "check_plan": ".plan",
    **dict.fromkeys(["PLAN_FILE", "is_pruned_folder", "load_model_folder", "load_pipeline", "load_pruned",
                     "save_model", "save_pruned"], ".storage"),
    **dict.fromkeys(["OUTPUT_LAYERS", "apply_plan", "macs_params", "magnitude_scores", "masks_to_student",
                     "prune_with_scores"], ".surgery"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
