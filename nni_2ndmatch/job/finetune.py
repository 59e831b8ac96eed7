"""The finetune stage: the strategy the config names, the loop with its trackers and validation,
then the student (and, for a pipeline teacher, the pipeline with it) saved with the run's summary."""

from __future__ import annotations

import logging
import shutil
from typing import Any

from torch import nn

from ..config import Config
from ..errors import UserError, user_errors
from ..files import atomic_write_json
from ..finetuners import Finetuner, finetuner_class
from ..method import FLOW, is_flow_matching
from ..models import PipelineParts, count_params
from ..pruning import save_model, save_pipeline
from ..training import Runtime, Validation, Watch, finetune
from ..training.trackers import Trackers, tracker_names
from .data import TrainingData
from .output import RunFolder
from .results import RunSummary
from .validation import make_validation

logger = logging.getLogger(__name__)


def schedule_summary(scheduler: Any) -> dict[str, Any]:
    """What the summary records of a pipeline's training schedule: its betas and prediction type,
    or under flow matching its class and shift."""
    if is_flow_matching(scheduler):
        return {"flow_matching": type(scheduler).__name__, "shift": scheduler.config.shift, "prediction_type": FLOW}
    return {k: scheduler.config[k] for k in ("beta_schedule", "prediction_type")}


def _check_free_space(out: RunFolder, student: nn.Module, config: Config) -> None:
    """Refuse to start a finetune whose checkpoints cannot fit on the output folder's disk.

    A checkpoint holds the student, its EMA copy and Adam's two moments; ``keep_checkpoints`` of
    them stay on disk, one more is written before the oldest goes, and the student is saved at the end.
    """
    weights = sum(t.numel() * t.element_size() for t in student.state_dict().values())
    train = config.finetune
    per_checkpoint = weights * (3 + (train.ema_decay is not None))
    needed = per_checkpoint * (train.keep_checkpoints + 1) + weights
    free = shutil.disk_usage(out.root).free
    if free < needed:
        raise UserError(f"output_dir {str(out.root)!r}: {free / 2**20:.1f} MiB free on its disk, but this finetune "
                        f"needs about {needed / 2**20:.1f} MiB ({train.keep_checkpoints + 1} checkpoints of "
                        f"{per_checkpoint / 2**20:.1f} MiB and the student); free space, lower "
                        "finetune.keep_checkpoints or choose another output_dir")


def make_finetuner(config: Config, parts: PipelineParts | None = None) -> Finetuner:
    """The config's strategy with its options, on the teacher pipeline's schedule when there is one."""
    section = config.finetune
    return finetuner_class(section.finetuner)(scheduler=parts.scheduler if parts else None, options=section.options)


def run_finetune(config: Config, out: RunFolder, teacher: nn.Module, data: TrainingData,
                 student: nn.Module, *, resume: bool = False, progress: bool = True,
                 runtime: Runtime | None = None, parts: PipelineParts | None = None,
                 finetuner: Finetuner | None = None) -> tuple[RunSummary, nn.Module]:
    """Finetune ``student`` (checked against the data by ``run_job``) against the teacher with
    ``finetuner`` (default: ``make_finetuner``); the main process saves it with a summary (and,
    for a pipeline teacher, ``parts``, the pipeline with the student in it). Returns the summary
    and the finetuned student."""
    runtime = runtime or Runtime(config.finetune.device)
    section = config.finetune
    finetuner = finetuner or make_finetuner(config, parts)

    def watchers() -> tuple[Trackers | None, Validation | None]:  # the main process's
        _check_free_space(out, student, config)
        names = tracker_names(section.report_to)
        trackers = Trackers(names, out.logs, out.root.name, {**config.model_dump(mode="json"), "finetune": {
            **section.model_dump(mode="json"), **finetuner.options()}}, finetuner.weights(), section.batch_size) \
            if names else None
        try:
            return trackers, make_validation(config, out.samples, teacher, data, parts, trackers)
        except BaseException:
            if trackers is not None:
                trackers.finish()
            raise
    trackers, validation = runtime.on_main(watchers) or (None, None)
    if not runtime.is_main and section.validation_every:  # the others wait for the main one's validation
        validation = Validation(section.validation_every, lambda step, student: None)
    try:
        with user_errors("finetune"):  # e.g. a batch size the processes cannot share
            result = finetune(student, teacher, finetuner, data.dataset, section.train_config(), out.root,
                              resume=resume, runtime=runtime, watch=Watch(progress, trackers.log if trackers else None,
                                                                          validation))
    finally:
        if trackers is not None:
            trackers.finish()
    summary = RunSummary(
        finetuner=finetuner.name, finetuner_options=finetuner.options(),
        train_config=section.train_config().model_dump(), steps=result.step, seconds=result.seconds,
        final=result.history[-1] if result.history else {},
        teacher_params=count_params(teacher), student_params=count_params(result.student),
        processes=runtime.world_size, loss_weights=finetuner.weights(),
        pipeline_dir=out.pipeline.name if parts is not None else None,
        schedule=schedule_summary(finetuner.scheduler) if parts else None, overhead_seconds=result.overhead_seconds,
        process_seconds=result.process_seconds)

    def save() -> None:
        save_model(result.student, out.student)
        if parts is not None:
            save_pipeline(result.student, parts.path, out.pipeline)
            logger.info("saved the pipeline with the student to %s", out.pipeline)
        atomic_write_json(out.summary, summary.to_json())
        logger.info("saved the student to %s", out.student)
    runtime.on_main(save)
    return summary, result.student
