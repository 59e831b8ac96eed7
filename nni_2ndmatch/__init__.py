"""nni-2ndmatch: second-order Jacobian matching (2ndMatch) for finetuning pruned diffusion models.

Its layers, each importing only from those below it, are drawn once, in docs/development.md.
"""

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:  # the public names; at run time each is imported on first use (nni_2ndmatch.lazy)
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
        SecondMatchDistiller,
        diffusion_evaluator,
        distiller_class,
        dsm_training_step,
        prune_diffusers,
    )
    from .pruning import as_component, load_pipeline, load_pruned, masks_to_student, pruned_class, save_pruned
    from .training import FinetuneResult, NonFiniteLossError, Runtime, TrainConfig, finetune

_exported, __dir__, __all__ = lazy_exports(__name__)


def __getattr__(name: str):
    if name in __all__:
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

