"""A run's output folder: every path in it (named once, in layout.py), the one decision whether it
already holds a run, making it ready for a new, resumed or overwritten run, and the resolved config
written into it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import Config
from ..errors import UserError
from ..files import atomic_write_text
from ..layout import (
    CACHE_DIR,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LOGS_DIR,
    METRICS_FILE,
    ONNX_DIR,
    PIPELINE_DIR,
    PRUNED_DIR,
    PRUNING_REPORT,
    REPORT_DIR,
    RUN_MARKERS,
    SAMPLES_DIR,
    STUDENT_DIR,
    SUMMARY_FILE,
)
from ..training.options import RESUME_FREE as TRAIN_RESUME_FREE


@dataclass(frozen=True)
class RunFolder:
    """``output_dir`` and the paths in it."""

    root: Path

    @classmethod
    def of(cls, config: Config) -> RunFolder:
        return cls(Path(config.output_dir))

    config = property(lambda self: self.root / CONFIG_FILE)
    pruned = property(lambda self: self.root / PRUNED_DIR)
    pruning_report = property(lambda self: self.root / PRUNING_REPORT)
    checkpoints = property(lambda self: self.root / CHECKPOINT_DIR)
    metrics = property(lambda self: self.root / METRICS_FILE)
    logs = property(lambda self: self.root / LOGS_DIR)
    samples = property(lambda self: self.root / SAMPLES_DIR)
    student = property(lambda self: self.root / STUDENT_DIR)
    pipeline = property(lambda self: self.root / PIPELINE_DIR)
    summary = property(lambda self: self.root / SUMMARY_FILE)
    cache = property(lambda self: self.root / CACHE_DIR)
    report = property(lambda self: self.root / REPORT_DIR)
    onnx = property(lambda self: self.root / ONNX_DIR)

    def holds_run(self) -> bool:
        return any((self.root / name).exists() for name in RUN_MARKERS)

    def prepare(self, command: str, resume: bool, overwrite: bool, keep_pruned: bool) -> None:
        """Check that the folder can take this run and make it ready: a folder that holds a run
        needs ``resume`` or ``overwrite``; an overwrite removes the old run's outputs (but the pruned
        student, when ``keep_pruned``: ``finetune`` starts from it). Then it must be writable."""
        out = self.root
        if out.exists() and not out.is_dir():
            raise UserError(f"output_dir {str(out)!r} is a file, not a folder; choose another output_dir")
        if self.holds_run() and not resume and not overwrite:
            raise UserError(f"output_dir {str(out)!r} already holds a run; pass --resume to continue it "
                            "or --overwrite to replace it")
        if command != "finetune" and self.pruned.exists() and not resume and not overwrite:  # finetune starts there
            raise UserError(f"output_dir {str(out)!r} already holds a pruned student ({PRUNED_DIR}/); pass --resume to "
                            "keep it or --overwrite to prune again")
        if resume and command != "prune" and not (self.checkpoints / "latest").is_file():  # prune: see run_job
            raise UserError(f"--resume: output_dir {str(out)!r} holds no checkpoint to resume from")
        if overwrite and not resume:
            for path in (self.checkpoints, self.student, self.pipeline, self.logs, self.samples, self.report,
                         self.onnx, *(() if keep_pruned else (self.pruned,))):
                shutil.rmtree(path, ignore_errors=True)
            for path in (self.summary, self.metrics, self.config, *(() if keep_pruned else (self.pruning_report,))):
                path.unlink(missing_ok=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output_dir {str(out)!r} is not writable: {e}") from None


# fields that may change between a run and its --resume: they do not change the trained weights
# (finetune.steps too, when the learning rate does not depend on it)
RESUME_FREE = {"output_dir", "threads", "evaluate", "export", "finetune.process_timeout_s", "finetune.device",
               "finetune.report_to", "finetune.validation_every", "finetune.validation_images",
               "finetune.validation_prompts", *(f"finetune.{name}" for name in TRAIN_RESUME_FREE)}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"section.key": value}."""
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def write_config(config: Config, resume: bool, finetuner_options: dict[str, Any] | None = None) -> None:
    """The resolved config (defaults filled in, and ``finetuner_options``: the strategy's options
    as the run uses them, choices such as ``mode: auto`` made) goes to output_dir/config.yaml.
    ``resume``: the config of the run being resumed must agree with it on every field that changes
    the weights."""
    path = RunFolder.of(config).config
    resolved = {k: v for k, v in config.model_dump(mode="json").items() if v is not None}  # no empty sections
    resolved["finetune"].update(finetuner_options or config.finetune.finetuner_kwargs())  # the strategy's defaults
    if resume and path.is_file():
        before = flatten(yaml.safe_load(path.read_text()))
        now = flatten(resolved)
        free = RESUME_FREE | ({"finetune.steps"} if config.finetune.lr_schedule == "constant" else set())
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k)
                         and not any(k == f or k.startswith(f + ".") for f in free))
        if changed:
            raise UserError(f"--resume: the config differs from the run's ({path}) in "
                            + ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in changed)
                            + "; resume with the run's settings, or start a new run (another output_dir, or "
                            "--overwrite without --resume)")
    atomic_write_text(path, yaml.safe_dump(resolved, sort_keys=False))
