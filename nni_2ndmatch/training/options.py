"""The options of the finetuning loop (TrainConfig).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


def checkpointing_refusal(gradient_checkpointing: bool, mode: str | None) -> str | None:
    """Why ``gradient_checkpointing`` is refused with the Jacobian term's ``mode``, or None: the one
    rule behind the config file's check and the Python API's."""
    if gradient_checkpointing and mode == "jvp":
        return "with mode 'jvp' (forward mode cannot go through a recomputation); use mode vjp or fd"
    return None


#: TrainConfig fields a resumed run may change: they do not change the trained weights (the data
#: order does not depend on the workers; accumulation splits the same batch).
RESUME_FREE = frozenset({"checkpoint_every", "keep_checkpoints", "log_every", "max_nonfinite_steps", "num_workers",
                         "gradient_accumulation_steps", "gradient_checkpointing"})


class TrainConfig(BaseModel):
    """Options of the finetuning loop (reference recipe: Adam lr 2e-4, constant, clip 1.0, EMA 0.9999).

    Also the training part of a config file's ``finetune`` section; bad values raise a
    ``pydantic.ValidationError`` (a ValueError) naming the field, the value and the allowed range.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # a bool is no number, "3" no integer

    steps: int = Field(200, ge=1, description="optimisation steps")
    batch_size: int = Field(16, ge=1, description="global batch size (all processes, all accumulation steps)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimisation step")
    mixed_precision: Literal["no", "bf16"] = "no"  # autocast for the network passes; the Jacobian term stays fp32
    lr: float = Field(2e-4, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, lt=1)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # decays to 0 after warm-up
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null: no clipping")
    ema_decay: float | None = Field(0.9999, gt=0, lt=1, description="min(ema_decay, (1+s)/(10+s)); null: no EMA")
    antithetic: bool = True  # timesteps t and T-1-t in pairs
    timestep_density: Literal["uniform", "logit_normal"] = Field(
        "uniform", description="how training timesteps are drawn: uniform over the schedule's ranks, or logit-normal "
        "as diffusers' SD3 scripts draw them: u = sigmoid(N(logit_mean, logit_std)) and sigma = 1 - u before the "
        "scheduler's shift (so a positive logit_mean favours less noise, the reverse of the SD3 paper's sign)")
    logit_mean: float = Field(0.0, allow_inf_nan=False, description="timestep_density logit_normal: its mean")
    logit_std: float = Field(1.0, gt=0, allow_inf_nan=False, description="timestep_density logit_normal: its std")
    hflip: bool = False  # random horizontal flips
    dropout: float | None = Field(None, ge=0, lt=1, description="p of the student's residual-block dropout (nn.Dropout "
                                  "modules named 'dropout', as in diffusers' ResnetBlock2D) during the run; the "
                                  "reference: 0.1; null: as the model has it")
    gradient_checkpointing: bool = Field(False, description="recompute the student's block activations in the "
                                         "backward pass: less memory, more time; mode vjp or fd")
    seed: int = Field(0, ge=0)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="data loader worker processes that read and decode ahead of the step (0: in the "
        "training process); auto: none for data in memory or in the encoded cache, else the CPUs beyond torch's "
        "threads (1 to 8)")
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    max_nonfinite_steps: int = Field(10, ge=1, description="consecutive skipped steps before the run stops")

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_within_the_run(cls, value: int, info: ValidationInfo) -> int:
        steps = info.data.get("steps")
        if steps is not None and value > steps:
            raise ValueError(f"the learning rate would never reach lr in steps={steps}; allowed: 0 to {steps}")
        return value

    @model_validator(mode="after")
    def _logit_options_need_their_density(self) -> "TrainConfig":
        defaults = {name: type(self).model_fields[name].default for name in ("logit_mean", "logit_std")}
        given = [name for name, default in defaults.items() if getattr(self, name) != default]
        if given and self.timestep_density != "logit_normal":
            raise ValueError(f"{' and '.join(given)} given with timestep_density={self.timestep_density!r}; they "
                             "shape the logit_normal density only: set timestep_density: logit_normal or remove them")
        return self

    def resume_changes(self, saved: dict[str, Any]) -> list[str]:
        """What this config changes against ``saved`` (a checkpoint's ``train_config``) that
        changes the trained weights, as "field (saved -> now)"; ``steps`` only where the learning
        rate depends on it."""
        free = RESUME_FREE | ({"steps"} if self.lr_schedule == "constant" else set())
        now = json.loads(json.dumps(self.model_dump()))
        return [f"{k} ({saved[k]!r} -> {now[k]!r})" for k in sorted(saved.keys() & now.keys())  # (a field that
                if k not in free and saved[k] != now[k]]  # another version added or removed is in one of them only)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        if self.lr_schedule == "linear":
            return self.lr * (1.0 - progress)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
