"""What a job's stages hand on, typed (written as JSON where a file holds them)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..layout import STUDENT_DIR


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """A finetune as ``summary.json`` records it: the strategy and its options as used, the loop's
    options, the steps and seconds (every part of a resumed run counted), the last logged terms,
    the models' sizes, the number of processes, and where the student (and pipeline) went."""

    finetuner: str
    finetuner_options: dict[str, Any]
    train_config: dict[str, Any]
    steps: int
    seconds: float
    final: dict[str, float]
    teacher_params: int
    student_params: int
    processes: int
    student_dir: str = STUDENT_DIR
    pipeline_dir: str | None = None  # a pipeline teacher: its pipeline, with the student in it
    schedule: dict[str, Any] | None = None  # a pipeline teacher: the schedule trained on

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
