"""The NNI integration, the only place that imports NNI (lazily, inside the functions that use it):
pruners by name (NNI's and torch-pruning's) with config_list checks, and 2ndMatch as an NNI
distiller."""

from ..lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["check_config_list", "check_config_list_model", "config_list_problems", "default_config_list"],
                    ".config_list"),
    **dict.fromkeys(["NoisyBatches", "SecondMatchDistiller", "diffusion_evaluator", "distiller_class",
                     "dsm_training_step"], ".distiller"),  # SecondMatchDistiller: built on first use (it imports NNI)
    **dict.fromkeys(["NNI_PRUNERS", "PRUNER_REGISTRY", "PRUNERS", "PruneRequest", "PrunerSpec",
                     "check_config_list_pruner", "nni_masks", "prune_diffusers", "pruner_spec", "register_pruner"],
                    ".pruners"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
