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
from .schedule import PREDICTION_TYPES, add_noise, default_scheduler, sample_timesteps
from .terms import (
    JAC_MATCHES,
    dsm_term,
    jacobian_match_per_sample,
    jacobian_match_term,
    kd_term,
    model_output,
    sample_directions,
    squared_norm,
)

__all__ = [
    "DEFAULT_FD_STEP", "DEFAULT_MODE", "JAC_MATCHES", "MODES", "Mode", "PREDICTION_TYPES", "add_noise",
    "checkpoint_as_forward", "default_scheduler", "dsm_term", "fp32_precision", "jacobian_match_per_sample",
    "jacobian_match_term", "jacobian_safe", "jacobian_sensitivity", "kd_term", "model_output", "output_and_product",
    "output_and_sensitivity", "precision_state", "sample_directions", "sample_timesteps", "second_match_loss",
    "squared_norm", "student_and_teacher_products", "student_and_teacher_sensitivity",
]
