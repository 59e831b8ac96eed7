"""The jobs behind the command line, callable from Python: load what a config names, finetune, save."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, ModelSpec
from .data import DigitsDataset, ImageFolderDataset
from .finetuners import get_finetuner
from .io import atomic_write_json
from .losses import model_output
from .models import build_builtin, count_params, load_diffusers_model, save_diffusers_model
from .training import CHECKPOINT_DIR, Runtime, finetune

logger = logging.getLogger(__name__)


class UserError(Exception):
    """A problem with the user's input or environment: reported without a traceback, exit code 2."""


def load_model(spec: ModelSpec, role: str) -> nn.Module:
    try:
        if spec.builtin is not None:
            return build_builtin(spec.builtin, width=spec.width, seed=spec.seed)
        return load_diffusers_model(spec.path)
    except (ValueError, OSError) as e:
        raise UserError(f"model.{role}: {e}") from None


def load_dataset(config: Config) -> torch.utils.data.Dataset:
    data = config.data
    try:
        if data.builtin == "digits":
            if data.channels != 1:
                raise ValueError(f"channels={data.channels}: the digits are greyscale; allowed: 1")
            return DigitsDataset(resolution=data.resolution, split="train")
        return ImageFolderDataset(data.path, resolution=data.resolution, channels=data.channels)
    except (ValueError, OSError) as e:
        raise UserError(f"data: {e}") from None


def _preflight(teacher: nn.Module, student: nn.Module, sample: torch.Tensor) -> None:
    """One forward of each model on a data-shaped input: catches shape mismatches before training."""
    x, t = sample.unsqueeze(0), torch.zeros(1)
    for role, model in (("teacher", teacher), ("student", student)):
        try:
            with torch.no_grad():
                model_output(model, x, t)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"model.{role} does not accept the data's images of shape {tuple(x.shape)}: "
                            f"{str(e).splitlines()[0]}") from None


def prepare_output_dir(config: Config, resume: bool, overwrite: bool) -> Path:
    out = Path(config.output_dir)
    has_run = (out / CHECKPOINT_DIR).exists() or (out / "summary.json").exists()
    if has_run and not resume and not overwrite:
        raise UserError(f"output_dir {str(out)!r} already holds a run; pass --resume to continue it "
                        "or --overwrite to replace it")
    if resume and not (out / CHECKPOINT_DIR / "latest").is_file():
        raise UserError(f"--resume: output_dir {str(out)!r} holds no checkpoint to resume from")
    if overwrite and not resume:
        for name in (CHECKPOINT_DIR, "student"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("summary.json", "metrics.jsonl"):
            (out / name).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir {str(out)!r} is not writable: {e}") from None
    return out


def run_finetune(config: Config, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Finetune the config's student against its teacher and save it with a summary."""
    out = prepare_output_dir(config, resume, overwrite)
    teacher = load_model(config.model.teacher, "teacher")
    student = load_model(config.model.student, "student")
    dataset = load_dataset(config)
    _preflight(teacher, student, dataset[0])
    section = config.finetune
    finetuner = get_finetuner(section.finetuner, **section.finetuner_kwargs())
    result = finetune(student, teacher, finetuner, dataset, section.train_config(), out, resume=resume,
                      runtime=Runtime(section.device), progress=progress)
    save_diffusers_model(result.student, out / "student")
    summary = {
        "finetuner": finetuner.name, "finetuner_options": finetuner.options(),
        "train_config": section.train_config().model_dump(), "steps": result.step,
        "seconds": result.seconds, "final": result.history[-1] if result.history else {},
        "teacher_params": count_params(teacher), "student_params": count_params(result.student),
        "student_dir": "student",
    }
    atomic_write_json(out / "summary.json", summary)
    logger.info("saved the student to %s", out / "student")
    return summary


def summary_text(summary: dict[str, Any]) -> str:
    return json.dumps({k: summary[k] for k in ("finetuner", "steps", "seconds", "final")}, indent=2)
