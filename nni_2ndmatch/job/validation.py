"""Validation during training (``finetune.validation_every``): the EMA student's sample grid from
fixed noise with ``evaluate``'s deterministic sampler, written to ``OUT/samples/step-NNNNNN.png``
and sent to the trackers; the teacher's grid from the same noise once, as ``teacher.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..config import Config, EvaluateSection
from ..files import atomic_write_json, read_json_object
from ..models import PipelineParts
from ..training import Validation
from .data import TrainingData
from .evaluate import Evaluator, PipelineEvaluator, Scores
from .report import save_grid


def make_validation(config: Config, folder: Path, teacher: nn.Module, data: TrainingData, parts: PipelineParts | None,
                    trackers: Any = None) -> Validation | None:
    """The loop's validation as the finetune section asks, its grids in ``folder``, or None when
    ``validation_every`` is 0.
    Conditions: ``validation_prompts`` (else the data's first captions) for a text-to-image
    pipeline, the data's first labels for a class-conditional model."""
    section = config.finetune
    if not section.validation_every:
        return None
    e = config.evaluate or EvaluateSection()
    n = section.validation_images
    if parts is not None and parts.latent:
        grid = e.model_copy(update={"samples": n, "fid_features": None, "clip_model": None})  # sampling only
        sampler: Scores = PipelineEvaluator(parts, teacher, data, grid, config.data.resolution,
                                            prompts=section.validation_prompts)
    else:
        sampler = Evaluator(teacher, data.dataset, samples=n, ddim_steps=e.ddim_steps, seed=e.seed, digits=None,
                            scheduler=parts.scheduler if parts is not None else None)
    folder.mkdir(parents=True, exist_ok=True)
    # what draws the grids; a resume may change it (RESUME_FREE): then the teacher's grid, and any step
    # the interrupted run drew past the checkpoint, are drawn again from the new noise and prompts
    drawn_by = {"validation_images": n, "validation_prompts": section.validation_prompts, "seed": e.seed,
                "ddim_steps": e.ddim_steps, "guidance_scale": e.guidance_scale}
    record = folder / "validation.json"
    same = record.is_file() and read_json_object(record) == drawn_by
    if not same or not (folder / "teacher.png").is_file():
        save_grid(sampler.teacher_samples, folder / "teacher.png", columns=min(n, 8))
        atomic_write_json(record, drawn_by)
        if trackers is not None:
            trackers.log_images({"samples/teacher": sampler.teacher_samples}, step=0)

    def validate(step: int, student: nn.Module) -> None:
        path = folder / f"step-{step:06d}.png"
        if same and path.is_file():  # a resumed run that already drew this step (the same weights, the same images)
            return
        samples = sampler.sample(student)
        save_grid(samples, path, columns=min(n, 8))
        if trackers is not None:
            trackers.log_images({"samples/student": samples}, step=step)

    return Validation(section.validation_every, validate)
