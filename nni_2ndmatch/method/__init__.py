"""The 2ndMatch method in pure PyTorch (no NNI): the loss terms, the Jacobian-sensitivity
estimators, fp32 precision control and the noise schedule."""

from .jacobian import (
    DEFAULT_FD_STEP,
    DEFAULT_MODE,
    MODES,
    Mode,
    checkpoint_as_forward,
    jacobian_safe,
    jacobian_sensitivity,
    output_and_product,
    output_and_sensitivity,
    second_match_loss,
    student_and_teacher_products,
    student_and_teacher_sensitivity,
)
from .precision import fp32_precision, precision_state
from .schedule import (
    FLOW,
    PREDICTION_TYPES,
    add_noise,
    default_scheduler,
    is_flow_matching,
    model_timesteps,
    noise_scale,
    own_schedule,
    prediction_of,
    require_epsilon,
    require_scheduler,
    sample_timesteps,
)
from .terms import (
    ADDED_CONDITIONS,
    JAC_MATCHES,
    JAC_WEIGHTINGS,
    TermForm,
    dsm_term,
    forward_kwargs,
    jacobian_match_per_sample,
    jacobian_match_term,
    jacobian_term,
    jacobian_weight,
    kd_term,
    model_output,
    sample_directions,
    squared_norm,
)

__all__ = [
    "ADDED_CONDITIONS", "DEFAULT_FD_STEP", "DEFAULT_MODE", "FLOW", "JAC_MATCHES", "JAC_WEIGHTINGS", "MODES", "Mode",
    "PREDICTION_TYPES", "TermForm", "add_noise", "checkpoint_as_forward", "is_flow_matching", "model_timesteps",
    "prediction_of", "default_scheduler", "dsm_term", "forward_kwargs", "fp32_precision", "jacobian_match_per_sample",
    "jacobian_match_term",
    "jacobian_safe", "jacobian_sensitivity", "jacobian_term", "jacobian_weight", "kd_term", "model_output",
    "noise_scale", "output_and_product", "own_schedule", "output_and_sensitivity", "precision_state", "require_epsilon",
    "require_scheduler",
    "sample_directions",
    "sample_timesteps", "second_match_loss", "squared_norm", "student_and_teacher_products",
    "student_and_teacher_sensitivity",
]
