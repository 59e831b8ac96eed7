"""The finetuning loop: options, one-process runtime (Accelerate's in ``training.accelerate``),
checkpoints, and ``finetune`` itself."""

from ..errors import NonFiniteLossError
from .loop import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    FinetuneResult,
    Validation,
    Watch,
    check_batch,
    check_finetuner,
    check_student_options,
    finetune,
)
from .options import TrainConfig
from .runtime import Runtime
from .state import EMA, TrainState

__all__ = ["CHECKPOINT_DIR", "EMA", "METRICS_FILE", "FinetuneResult", "NonFiniteLossError", "Runtime", "TrainConfig",
           "TrainState", "Validation", "Watch", "check_batch", "check_finetuner", "check_student_options",
           "finetune"]
