"""nni-2ndmatch: second-order Jacobian matching (2ndMatch) for finetuning pruned diffusion models.

Its layers, each importing only from those below it, are drawn once, in docs/development.md.
"""

from .finetuners import (
    Finetuner,
    FinetunerOptions,
    available_finetuners,
    finetuner_options,
    get_finetuner,
    register_finetuner,
)
from .method import (
    TermForm,
    add_noise,
    default_scheduler,
    jacobian_safe,
    jacobian_sensitivity,
    sample_directions,
    second_match_loss,
)
from .models import build_builtin, example_conditioning
from .nni import (
    NoisyBatches,
    diffusion_evaluator,
    distiller_class,
    dsm_training_step,
    prune_diffusers,
)
from .pruning import as_component, load_pipeline, load_pruned, masks_to_student, pruned_class, save_pruned
from .pruning.component import dense_of
from .training import FinetuneResult, NonFiniteLossError, Runtime, TrainConfig, finetune

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "SecondMatchDistiller":  # built on first use: it subclasses an NNI class
        return distiller_class()
    if dense_of(name):  # a pruned class, built on first use
        return pruned_class(dense_of(name))
    if name == "ModelMixin":  # diffusers looks up the base classes of a component in its library
        from diffusers import ModelMixin

        return ModelMixin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TermForm", "add_noise", "as_component", "available_finetuners", "build_builtin", "default_scheduler",
    "diffusion_evaluator", "dsm_training_step", "example_conditioning", "finetune", "Finetuner", "FinetunerOptions",
    "finetuner_options", "FinetuneResult", "get_finetuner", "jacobian_safe", "jacobian_sensitivity", "load_pipeline",
    "load_pruned", "masks_to_student", "NoisyBatches", "NonFiniteLossError", "prune_diffusers", "pruned_class",
    "register_finetuner", "Runtime", "sample_directions", "save_pruned", "second_match_loss", "SecondMatchDistiller",
    "TrainConfig",
]
