"""nni-2ndmatch: second-order Jacobian matching (2ndMatch) for finetuning pruned diffusion models.

The core (losses, estimators, strategies, finetuning loop) is pure PyTorch and imports no NNI.
"""

from .distill import NoisyBatches, diffusion_evaluator, dsm_training_step
from .finetuners import (
    Finetuner,
    add_noise,
    available_finetuners,
    default_scheduler,
    finetuner_options,
    get_finetuner,
    register_finetuner,
)
from .losses import jacobian_safe, jacobian_sensitivity, sample_directions, second_match_loss
from .models import build_builtin, example_conditioning
from .pruning import load_pruned, masks_to_student, prune_diffusers, save_pruned
from .training import FinetuneResult, NonFiniteLossError, Runtime, TrainConfig, finetune

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "SecondMatchDistiller":  # built on first use: it subclasses an NNI class
        from .distill import distiller_class

        return distiller_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "add_noise", "available_finetuners", "build_builtin", "default_scheduler", "diffusion_evaluator",
    "dsm_training_step", "example_conditioning", "finetune", "Finetuner", "finetuner_options",
    "FinetuneResult", "get_finetuner", "jacobian_safe", "jacobian_sensitivity", "load_pruned",
    "masks_to_student", "NoisyBatches", "NonFiniteLossError", "prune_diffusers", "register_finetuner",
    "Runtime", "sample_directions", "save_pruned", "second_match_loss", "SecondMatchDistiller", "TrainConfig",
]
