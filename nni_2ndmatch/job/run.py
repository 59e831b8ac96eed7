"""A job from start to end: ``prune``, ``finetune`` or ``run`` (prune, finetune, then evaluate and
export when the config asks, and the report); the model cards last."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from ..config import Config
from ..errors import UserError
from ..pruning import is_pruned_folder
from ..scoped import torch_threads
from .card import write_model_cards
from .data import TrainingData, open_data
from .evaluate import evaluate_models
from .export import export_and_benchmark
from .finetune import run_finetune
from .inputs import JobInputs, check_inputs, make_runtime, preflight
from .output import RunFolder, write_config
from .prune import check_pruned_start, run_prune, saved_pruned_student
from .report import save_sample_grids, write_run_report
from .results import RunSummary

logger = logging.getLogger(__name__)


def run_job(config: Config, command: str, *, resume: bool = False, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """``prune``, ``finetune`` or ``run`` (prune when the config says so, then finetune, then the
    report when the config has an ``evaluate`` or ``export`` section), with torch on the config's
    ``threads`` (restored when the job ends)."""
    if command == "prune" and config.pruning is None:
        raise UserError("the config has no pruning section (model.student is given): nothing to prune")
    with torch_threads(config.resolved_threads()):
        return _run_stages(config, command, resume, overwrite, progress)


def _run_stages(config: Config, command: str, resume: bool, overwrite: bool, progress: bool) -> dict[str, Any]:
    runtime = make_runtime(config.finetune.device, config.finetune.process_timeout_s)
    inputs = check_inputs(config, resume, runtime)
    out, student = RunFolder.of(config), inputs.student
    if command == "finetune" and config.model.student is None:
        check_pruned_start(out, config)

    pruned = resume and is_pruned_folder(out.pruned)  # (read before the main process may prune)

    def prepare_folder() -> None:  # `finetune` keeps the pruned student it starts from
        out.prepare(command, resume, overwrite, keep_pruned=command == "finetune" and config.model.student is None)
        write_config(config, resume, inputs.finetuner.options())
    runtime.on_main(prepare_folder)
    data = open_data(config, inputs.data, inputs.parts, runtime, progress)
    if command in ("prune", "run") and config.pruning is not None:
        if pruned:  # pruned already: a resumed `prune` has nothing to do
            report = json.loads(out.pruning_report.read_text()) if command == "prune" else None
        else:
            student, report = run_prune(config, out, inputs.teacher, data.dataset, runtime,
                                        inputs.parts.scheduler if inputs.parts is not None else None)
        if command == "prune":
            return {"pruning": {k: v for k, v in report.items() if k != "groups"}}
    if student is None:  # `finetune` after a `prune`, or a resumed `run`
        student = saved_pruned_student(out)
        preflight({"student": student}, inputs.data.example)
    compare = command == "run" and config.evaluate is not None and config.evaluate.compare
    start = copy.deepcopy(student) if compare and runtime.is_main else None  # the baselines start here too
    summary, student = run_finetune(config, out, inputs.teacher, data, student, resume=resume,
                                    progress=progress, runtime=runtime, parts=inputs.parts,
                                    finetuner=inputs.finetuner)
    result = summary.to_json()
    if runtime.is_main:  # the finished student carries its card, whatever happens to the report
        write_model_cards(config, out.root, summary, reported=False)
    skipped = [k for k in ("evaluate", "export") if getattr(config, k) is not None]
    if runtime.is_main and command != "run" and skipped:
        logger.warning("the config's %s section%s run%s after 'nni-2ndmatch run' only; this '%s' leaves %s out",
                       " and ".join(skipped), "s" if len(skipped) > 1 else "", "" if len(skipped) > 1 else "s",
                       command, "them" if len(skipped) > 1 else "it")
    elif runtime.is_main and skipped:
        result["report"] = str(report_stages(config, out, inputs, student, data, summary, start, progress))
        write_model_cards(config, out.root, summary, reported=True)  # now with the quality and latency
    return result


def report_stages(config: Config, out: RunFolder, inputs: JobInputs, student: nn.Module, data: TrainingData,
                  summary: RunSummary, start: nn.Module | None, progress: bool) -> Path:
    """Evaluate (with the baselines), export and benchmark as the config's ``evaluate`` and
    ``export`` sections say; then the report draws what they returned. The path of report.md."""
    evaluation = latency = None
    if config.evaluate is not None:
        evaluation = evaluate_models(config, out.root, inputs.teacher, student, data, summary, start=start,
                                     parts=inputs.parts, progress=progress)
        save_sample_grids(out.root, evaluation)
    if config.export is not None:
        latency = export_and_benchmark(config.export, out, inputs.teacher, student, **text_tokens(data.dataset))
    pruning = json.loads(out.pruning_report.read_text()) \
        if config.pruning is not None and out.pruning_report.is_file() else None  # else: a given student
    return write_run_report(out.root, summary, pruning=pruning, evaluation=evaluation, latency=latency)


def text_tokens(dataset: Any) -> dict[str, int]:
    """``{"seq_len": n}``: the tokens of the run's caption embeddings (what the export's text input
    must take), or nothing for data without captions."""
    item = dataset[0]
    text = item.get("encoder_hidden_states") if isinstance(item, dict) else None
    return {"seq_len": int(text.shape[-2])} if text is not None else {}


def summary_text(summary: dict[str, Any]) -> str:
    keys = ("pruning", "finetuner", "steps", "seconds", "final", "report")
    return json.dumps({k: summary[k] for k in keys if k in summary}, indent=2)
