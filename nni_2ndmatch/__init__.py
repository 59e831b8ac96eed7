"""nni-2ndmatch: second-order Jacobian matching (2ndMatch) for finetuning pruned diffusion models.

Its layers, each importing only from those below it, are drawn once, in docs/development.md.
"""

from .lazy import lazy_exports

__version__ = "0.1.0"

#: The public names, each with the module that defines it: imported on first use, so that
#: ``import nni_2ndmatch`` (the CLI's start, a data loader worker's) costs no diffusers import.
_EXPORTS = {
    **dict.fromkeys(["Finetuner", "FinetunerOptions", "available_finetuners", "finetuner_options", "get_finetuner",
                     "register_finetuner"], ".finetuners"),
    **dict.fromkeys(["TermForm", "add_noise", "default_scheduler", "jacobian_safe", "jacobian_sensitivity",
                     "sample_directions", "second_match_loss"], ".method"),
    **dict.fromkeys(["build_builtin", "example_conditioning"], ".models"),
    **dict.fromkeys(["NoisyBatches", "SecondMatchDistiller", "diffusion_evaluator", "distiller_class",
                     "dsm_training_step", "prune_diffusers"], ".nni"),
    **dict.fromkeys(["as_component", "load_pipeline", "load_pruned", "masks_to_student", "pruned_class",
                     "save_pruned"], ".pruning"),
    "dense_of": ".pruning.component",
    **dict.fromkeys(["FinetuneResult", "NonFiniteLossError", "Runtime", "TrainConfig", "finetune"], ".training"),
}
_exported, __dir__ = lazy_exports(__name__, _EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return _exported(name)
    if name == "ModelMixin":  # diffusers looks up the base classes of a component in its library
        from diffusers import ModelMixin

        return ModelMixin
    if name.startswith("Pruned"):  # a pruned class (PrunedUNet2DModel), built on first use
        from .pruning import pruned_class
        from .pruning.component import dense_of

        if dense_of(name):
            return pruned_class(dense_of(name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TermForm", "add_noise", "as_component", "available_finetuners", "build_builtin", "default_scheduler",
    "diffusion_evaluator", "dsm_training_step", "example_conditioning", "finetune", "Finetuner", "FinetunerOptions",
    "finetuner_options", "FinetuneResult", "get_finetuner", "jacobian_safe", "jacobian_sensitivity", "load_pipeline",
    "load_pruned", "masks_to_student", "NoisyBatches", "NonFiniteLossError", "prune_diffusers", "pruned_class",
    "register_finetuner", "Runtime", "sample_directions", "save_pruned", "second_match_loss", "SecondMatchDistiller",
    "TrainConfig",
]
