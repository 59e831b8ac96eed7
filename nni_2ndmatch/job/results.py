"""What a job's stages hand on, typed (written as JSON where a file holds them)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from ..deploy.bench.results import BenchResults
from ..layout import STUDENT_DIR


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """A finetune as ``summary.json`` records it: the strategy, its options as used and its terms'
    weights, the loop's options, the steps and seconds (every part of a resumed run counted), the last logged terms,
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
    loss_weights: dict[str, float] = dataclasses.field(default_factory=dict)  # the finetuner's {term: weight}
    student_dir: str = STUDENT_DIR
    pipeline_dir: str | None = None  # a pipeline teacher: its pipeline, with the student in it
    schedule: dict[str, Any] | None = None  # a pipeline teacher: the schedule trained on
    overhead_seconds: float = 0.0  # of ``seconds``: validation grids and checkpoints
    process_seconds: float | None = None  # training seconds times processes, each part of a resume by its own

    @property
    def training_seconds(self) -> float:
        """``seconds`` less the validation grids and checkpoints: what a baseline, which writes
        neither, is timed on too."""
        return self.seconds - self.overhead_seconds

    def equal_time_steps(self, seconds_per_step: float) -> int:
        """The steps a one-process run at ``seconds_per_step`` makes in this run's training time on
        all its processes (process-seconds, each part of a resumed run on its own number of
        processes: the same hardware time, if training scaled linearly over processes; on one
        process, the run's wall clock)."""
        spent = self.process_seconds if self.process_seconds is not None else self.training_seconds * self.processes
        return max(1, round(spent / seconds_per_step))

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The quality table of a run. ``rows``: one per model (teacher, the start before finetuning,
    each baseline, the run), each with its scores (digits_fid, fidelity, fid, clip_score; None where
    not measured), finetune seconds and the file name of its sample grid; ``start``: where the
    starting student came from (None: no baselines); ``baselines``: each baseline's finetune (steps,
    seconds, options, where its student was saved); ``notes``: what the reader must know."""

    rows: list[dict[str, Any]]
    start: str | None
    finetune_seed: int
    baselines: dict[str, dict[str, Any]]
    notes: list[str]

    def row(self, role: str) -> dict[str, Any]:
        return next(row for row in self.rows if row["role"] == role)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The evaluation stage's result: its settings, the comparison, and the first samples of each
    model (file name -> images in [-1, 1]) for the report to draw."""

    samples: int
    ddim_steps: int
    seed: int
    comparison: Comparison
    grids: dict[str, Tensor]
    sampler: str = "DDIM"  # the deterministic sampler of every model's samples; flow matching: Euler

    def quality(self) -> dict[str, Any]:
        """The run's student against the teacher: fidelity, and each score measured for both."""
        teacher, run = self.comparison.row("teacher"), self.comparison.row("run")
        quality = {"samples": self.samples, "ddim_steps": self.ddim_steps, "sampler": self.sampler, "seed": self.seed,
                   "fidelity": run["fidelity"]}
        for key in ("digits_fid", "fid", "clip_score"):
            if run.get(key) is not None:
                quality.update({f"{key}_teacher": teacher[key], f"{key}_student": run[key]})
        return quality


@dataclasses.dataclass(frozen=True)
class Latency:
    """The export stage's result: the ONNX files (relative to the output directory, with their
    parity error) and the benchmark of teacher vs student."""

    onnx: dict[str, dict[str, Any]]
    bench: BenchResults

    def summary(self) -> dict[str, Any]:
        rows = [{k: row[k] for k in ("variant", "batch", "speedup", "macs_ratio")} for row in self.bench["results"]]
        return {"onnx": self.onnx, "macs_ratio": self.bench["macs_ratio"], "params_ratio": self.bench["params_ratio"],
                "rows": rows}
