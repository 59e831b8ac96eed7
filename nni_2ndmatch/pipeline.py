"""The jobs behind the command line, callable from Python: load what a config names, prune, finetune, save."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .config import Config, ModelSpec
from .data import collate
from .errors import UserError, user_errors
from .evaluation import OnnxFeatures, load_clip, needs_torchmetrics
from .files import atomic_write_json, atomic_write_text
from .finetuners import Finetuner, finetuner_class
from .job.card import write_model_cards
from .job.data import DataPlan, TrainingData, check_resume, open_data, plan_data
from .job.evaluate import evaluate_models
from .job.export import export_and_benchmark
from .job.results import RunSummary
from .job.validation import make_validation
from .layout import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LOGS_DIR,
    METRICS_FILE,
    PIPELINE_DIR,
    PRUNED_DIR,
    PRUNING_REPORT,
    SAMPLES_DIR,
    STUDENT_DIR,
    SUMMARY_FILE,
)
from .method import default_scheduler, model_output
from .models import (
    BUILTIN_PIPELINES,
    PipelineParts,
    build_builtin,
    conditioning_of,
    count_params,
    default_example_inputs,
    is_pipeline_folder,
    load_hub_model,
    load_pipeline_parts,
    write_tiny_sd,
)
from .nni import PRUNER_REGISTRY, prune_diffusers, pruner_spec
from .pruning import (
    is_pruned_folder,
    load_model_folder,
    load_pruned,
    save_model,
    save_pipeline,
    save_pruned,
)
from .report import save_sample_grids, write_run_report
from .scoped import torch_threads
from .training import Runtime, check_batch, finetune
from .training.accelerate import AccelerateRuntime, launched_distributed
from .training.trackers import Trackers, tracker_names

logger = logging.getLogger(__name__)



def make_runtime(device: str, timeout_s: float) -> Runtime:
    """The multi-process runtime (Accelerate, DDP) when a launcher started several processes;
    else the single-process one on ``device``. ``timeout_s``: how long a process waits for the others."""
    if not launched_distributed():
        return Runtime(device)
    with user_errors("finetune"):
        return AccelerateRuntime(device, timeout_s)


def load_configured_model(spec: ModelSpec, role: str) -> nn.Module:
    """A built-in architecture, a Hub model, a pruned-student folder or a diffusers model folder."""
    with user_errors(f"model.{role}", OSError):
        if spec.builtin is not None:
            return build_builtin(spec.builtin, width=spec.width, seed=spec.seed)
        if spec.hub is not None:
            return load_hub_model(spec.hub, spec.subfolder)
        return load_model_folder(spec.path)


def load_teacher(spec: ModelSpec, resolution: int) -> tuple[nn.Module, PipelineParts | None]:
    """The teacher, and when it comes from a pipeline (a pipeline folder, or a builtin pipeline
    written for ``resolution`` into a temporary folder that lives as long as the parts) what the
    run takes from that pipeline."""
    with user_errors("model.teacher", OSError):
        if spec.builtin in BUILTIN_PIPELINES:
            folder = tempfile.TemporaryDirectory(prefix=f"nni-2ndmatch-{spec.builtin}-")
            parts = load_pipeline_parts(write_tiny_sd(folder.name, seed=spec.seed, resolution=resolution))
            parts.keep = folder
        elif spec.path is not None and is_pipeline_folder(spec.path):
            parts = load_pipeline_parts(spec.path)
        else:
            return load_configured_model(spec, "teacher"), None
        return load_model_folder(parts.path), parts


def check_evaluate(config: Config, teacher: nn.Module, parts: PipelineParts | None) -> None:
    """The evaluate section against the teacher: pixel-space models sample with DDIM on the default
    schedule, latent pipelines through themselves (text-to-image or class-conditional); the CLIP
    score needs prompts, guidance a text encoder or diffusers' DiT null class."""
    e, text = config.evaluate, parts is not None and parts.text_encoder is not None
    conditioning = conditioning_of(teacher)
    labels = parts is not None and parts.latent and conditioning is not None and conditioning[0] == "class_labels"
    if parts is not None and parts.latent and not (text or labels):
        raise UserError(f"evaluate: the pipeline ({parts.path}) is latent and unconditional, which the "
                        "evaluation does not sample yet; remove the evaluate section")
    if parts is not None and not parts.latent:
        default = default_scheduler().config
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "trained_betas")
        if any(parts.scheduler.config[k] != default[k] for k in keys):
            raise UserError(f"evaluate: the pipeline ({parts.path}) has its own schedule, which the pixel-space "
                            "evaluation does not sample with yet; remove the evaluate section and sample "
                            "output_dir/pipeline with diffusers")
    if e.fid_features is not None:
        try:
            needs_torchmetrics()
            OnnxFeatures(e.fid_features).check_size(config.data.resolution, config.data.resolution)
        except Exception as err:  # onnxruntime raises its own types for files that are not ONNX models
            raise UserError(f"evaluate.fid_features: {str(err).splitlines()[0]}") from None
    if e.clip_model is not None and text:
        try:
            load_clip(e.clip_model)
        except Exception as err:  # transformers raises OSError, ValueError, ... for a folder it cannot read
            raise UserError(f"evaluate.clip_model: {str(err).splitlines()[0]}") from None
    if e.clip_model is not None and not text:
        raise UserError(f"evaluate.clip_model: value {e.clip_model!r} is not allowed: it needs prompts, i.e. a "
                        "text-to-image pipeline teacher; allowed here: null")
    if e.guidance_scale != 1.0 and not (text or labels and conditioning == ("class_labels", 1000)):
        raise UserError(f"evaluate.guidance_scale: value {e.guidance_scale!r} is not allowed: it needs a "
                        "text-to-image pipeline, or a DiT pipeline of 1000 classes (DiTPipeline takes class 1000 as "
                        "the unconditional one); allowed here: 1.0")


def _preflight(models: dict[str, nn.Module], item: Any) -> None:
    """One forward of each model on one data item: catches shape mismatches before any work."""
    x, kwargs = collate([item], torch.device("cpu"))
    t = torch.zeros(1)
    for role, model in models.items():
        try:
            with torch.no_grad():
                model_output(model, x, t, **kwargs)
        except (RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"model.{role} does not accept the data's images of shape {tuple(x.shape)}: "
                            f"{str(e).splitlines()[0]}") from None


def _check_free_space(out: Path, student: nn.Module, config: Config) -> None:
    """Refuse to start a finetune whose checkpoints cannot fit on the output folder's disk.

    A checkpoint holds the student, its EMA copy and Adam's two moments; ``keep_checkpoints`` of
    them stay on disk, one more is written before the oldest goes, and the student is saved at the end.
    """
    weights = sum(t.numel() * t.element_size() for t in student.state_dict().values())
    train = config.finetune
    per_checkpoint = weights * (3 + (train.ema_decay is not None))
    needed = per_checkpoint * (train.keep_checkpoints + 1) + weights
    free = shutil.disk_usage(out).free
    if free < needed:
        raise UserError(f"output_dir {str(out)!r}: {free / 2**20:.1f} MiB free on its disk, but this finetune "
                        f"needs about {needed / 2**20:.1f} MiB ({train.keep_checkpoints + 1} checkpoints of "
                        f"{per_checkpoint / 2**20:.1f} MiB and the student); free space, lower "
                        "finetune.keep_checkpoints or choose another output_dir")


# fields that may change between a run and its --resume: they do not change the trained weights
# (finetune.steps too, when the learning rate does not depend on it)
RESUME_FREE = {"output_dir", "threads", "evaluate", "export", "finetune.log_every", "finetune.checkpoint_every",
               "finetune.keep_checkpoints", "finetune.process_timeout_s", "finetune.device",
               "finetune.gradient_accumulation_steps", "finetune.max_nonfinite_steps",
               "finetune.gradient_checkpointing", "finetune.report_to", "finetune.validation_every",
               "finetune.validation_images", "finetune.validation_prompts"}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def write_config(config: Config, resume: bool, finetuner_options: dict[str, Any] | None = None) -> None:
    """The resolved config (defaults filled in, and ``finetuner_options``: the strategy's options
    as the run uses them, choices such as ``mode: auto`` made) goes to output_dir/config.yaml.
    ``resume``: the config of the run being resumed must agree with it on every field that changes
    the weights."""
    path = Path(config.output_dir) / CONFIG_FILE
    resolved = config.model_dump(mode="json")
    resolved["finetune"].update(finetuner_options or config.finetune.finetuner_kwargs())  # the strategy's defaults
    if resume and path.is_file():
        before = _flatten(yaml.safe_load(path.read_text()))
        now = _flatten(resolved)
        free = RESUME_FREE | ({"finetune.steps"} if config.finetune.lr_schedule == "constant" else set())
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k)
                         and not any(k == f or k.startswith(f + ".") for f in free))
        if changed:
            raise UserError(f"--resume: the config differs from the run's ({path}) in "
                            + ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in changed)
                            + "; resume with the run's settings, or start a new run (another output_dir, or "
                            "--overwrite without --resume)")
    atomic_write_text(path, yaml.safe_dump(resolved, sort_keys=False))


def prepare_output_dir(config: Config, command: str, resume: bool, overwrite: bool) -> Path:
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {str(out)!r} is a file, not a folder; choose another output_dir")
    has_run = (out / CHECKPOINT_DIR).exists() or (out / SUMMARY_FILE).exists()
    if has_run and not resume and not overwrite:
        raise UserError(f"output_dir {str(out)!r} already holds a run; pass --resume to continue it "
                        "or --overwrite to replace it")
    if resume and not (out / CHECKPOINT_DIR / "latest").is_file():
        raise UserError(f"--resume: output_dir {str(out)!r} holds no checkpoint to resume from")
    if overwrite and not resume:  # `finetune` keeps the pruned student it starts from
        keep_pruned = command == "finetune" and config.model.student is None
        for name in (CHECKPOINT_DIR, STUDENT_DIR, PIPELINE_DIR, LOGS_DIR, SAMPLES_DIR,
                     *(() if keep_pruned else (PRUNED_DIR,))):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (SUMMARY_FILE, METRICS_FILE, CONFIG_FILE, *(() if keep_pruned else (PRUNING_REPORT,))):
            (out / name).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir {str(out)!r} is not writable: {e}") from None
    return out


def _example_inputs(teacher: nn.Module, item: Any) -> dict[str, Any]:
    """The teacher's forward arguments, shaped like one data item (with its conditioning)."""
    inputs = default_example_inputs(teacher)
    x, kwargs = collate([item], torch.device("cpu"))
    inputs[next(iter(inputs))] = x
    inputs.update(kwargs)
    return inputs


def run_prune(config: Config, out: Path, teacher: nn.Module, dataset: torch.utils.data.Dataset,
              runtime: Runtime | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Make the student from the teacher as the pruning section says; save it under out/pruned.
    With several processes the main one prunes and the others load what it saved."""
    runtime = runtime or Runtime()
    if not runtime.is_main:
        runtime.barrier()
        return load_pruned(out / PRUNED_DIR), json.loads((out / PRUNING_REPORT).read_text())
    p = config.pruning
    with user_errors("pruning"):  # e.g. a config_list NNI refuses
        student, report = prune_diffusers(teacher, p.pruner, p.sparse_ratio, round_to=p.round_to,
                                          example_inputs=_example_inputs(teacher, dataset[0]),
                                          config_list=p.config_list, data=dataset, seed=config.finetune.seed)
    save_pruned(student, out / PRUNED_DIR)
    atomic_write_json(out / PRUNING_REPORT, report)
    logger.info("pruned: MACs %.3g -> %.3g (%.2fx), params %d -> %d; saved to %s", report["macs_before"],
                report["macs_after"], report["macs_ratio"], report["params_before"], report["params_after"],
                out / PRUNED_DIR)
    runtime.barrier()
    return student, report


def saved_pruned_student(out: Path) -> nn.Module:
    """The student ``run_prune`` saved in out/pruned (what ``finetune`` starts from without ``model.student``)."""
    if is_pruned_folder(out / PRUNED_DIR):
        return load_pruned(out / PRUNED_DIR)
    raise UserError(f"no pruned student in {str(out / PRUNED_DIR)!r}: run 'nni-2ndmatch prune' (or 'run') first")


def make_finetuner(config: Config, parts: PipelineParts | None = None) -> Finetuner:
    """The config's strategy with its options, on the teacher pipeline's schedule when there is one."""
    section = config.finetune
    return finetuner_class(section.finetuner)(scheduler=parts.scheduler if parts else None, options=section.options)


def run_finetune(config: Config, out: Path, teacher: nn.Module, data: TrainingData,
                 student: nn.Module, *, resume: bool = False, progress: bool = True,
                 runtime: Runtime | None = None, parts: PipelineParts | None = None,
                 finetuner: Finetuner | None = None) -> tuple[RunSummary, nn.Module]:
    """Finetune ``student`` (checked against the data by ``run_job``) against the teacher with
    ``finetuner`` (default: ``make_finetuner``); the main process saves it with a summary (and,
    for a pipeline teacher, ``parts``, the pipeline with the student in it). Returns the summary
    and the finetuned student."""
    runtime = runtime or Runtime(config.finetune.device)
    if runtime.is_main:
        _check_free_space(out, student, config)
    section = config.finetune
    finetuner = finetuner or make_finetuner(config, parts)
    names = tracker_names(section.report_to) if runtime.is_main else []
    trackers = Trackers(names, out / LOGS_DIR, out.name, {**config.model_dump(mode="json"), "finetune": {
        **section.model_dump(mode="json"), **finetuner.options()}}, finetuner.weights(), section.batch_size) \
        if names else None
    validation = make_validation(config, out, teacher, data, parts, trackers) if runtime.is_main else None
    try:
        with user_errors("finetune"):  # e.g. a batch size the processes cannot share
            result = finetune(student, teacher, finetuner, data.dataset, section.train_config(), out, resume=resume,
                              runtime=runtime, progress=progress, on_log=trackers.log if trackers else None,
                              validation=validation)
    finally:
        if trackers is not None:
            trackers.finish()
    summary = RunSummary(
        finetuner=finetuner.name, finetuner_options=finetuner.options(),
        train_config=section.train_config().model_dump(), steps=result.step, seconds=result.seconds,
        final=result.history[-1] if result.history else {},
        teacher_params=count_params(teacher), student_params=count_params(result.student),
        processes=runtime.world_size, loss_weights=finetuner.weights(),
        pipeline_dir=PIPELINE_DIR if parts is not None else None,
        schedule={k: finetuner.scheduler.config[k] for k in ("beta_schedule", "prediction_type")} if parts else None)
    if runtime.is_main:
        save_model(result.student, out / STUDENT_DIR)
        if parts is not None:
            save_pipeline(result.student, parts.path, out / PIPELINE_DIR)
            logger.info("saved the pipeline with the student to %s", out / PIPELINE_DIR)
        atomic_write_json(out / SUMMARY_FILE, summary.to_json())
        logger.info("saved the student to %s", out / STUDENT_DIR)
    runtime.barrier()
    return summary, result.student


@dataclasses.dataclass(frozen=True)
class JobInputs:
    """Everything a job reads, checked before anything is written to (or deleted from) output_dir:
    the teacher (and its pipeline's parts), the data, a given student, and the strategy with its
    choices made (``mode: auto``)."""

    teacher: nn.Module
    parts: PipelineParts | None
    data: DataPlan
    student: nn.Module | None  # model.student; None: the pruning section makes it
    finetuner: Finetuner


def check_inputs(config: Config, resume: bool, runtime: Runtime) -> JobInputs:
    """Load and check every input of a job; a problem is a UserError naming the field."""
    teacher, parts = load_teacher(config.model.teacher, config.data.resolution)
    if config.evaluate is not None:
        check_evaluate(config, teacher, parts)
    if parts is not None and config.pruning is not None and pruner_spec(config.pruning.pruner).needs_gradients \
            and parts.scheduler.config.prediction_type != "epsilon":
        allowed = [name for name, spec in PRUNER_REGISTRY.items() if not spec.needs_gradients]
        raise UserError(f"pruning.pruner: value {config.pruning.pruner!r} is not allowed: it scores channels by the "
                        "gradients of the noise-prediction loss, and the pipeline predicts "
                        f"{parts.scheduler.config.prediction_type}; allowed: {', '.join(allowed)}")
    if config.finetune.validation_prompts is not None and (parts is None or parts.text_encoder is None):
        raise UserError(f"finetune.validation_prompts: value {config.finetune.validation_prompts!r} is not allowed: "
                        "the teacher takes no text prompts (only a text-to-image pipeline does); leave it out")
    plan = plan_data(config, teacher, parts)
    if resume:
        check_resume(config, plan)
    student = load_configured_model(config.model.student, "student") if config.model.student is not None else None
    _preflight({"teacher": teacher} if student is None else {"teacher": teacher, "student": student}, plan.example)
    with user_errors("finetune"):
        check_batch(config.finetune.train_config(), plan.items, runtime.world_size)
    finetuner = make_finetuner(config, parts)
    finetuner.resolve(teacher, tuple(collate([plan.example])[0].shape[1:]))  # e.g. mode: auto
    return JobInputs(teacher, parts, plan, student, finetuner)


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
    if runtime.is_main:
        prepare_output_dir(config, command, resume, overwrite)
        write_config(config, resume, inputs.finetuner.options())
    runtime.barrier()
    data = open_data(config, inputs.data, inputs.parts, runtime, progress)
    out, student = Path(config.output_dir), inputs.student
    if command in ("prune", "run") and config.pruning is not None:
        if not (resume and is_pruned_folder(out / PRUNED_DIR)):
            student, report = run_prune(config, out, inputs.teacher, data.dataset, runtime)
            if command == "prune":
                return {"pruning": {k: v for k, v in report.items() if k != "groups"}}
    if student is None:  # `finetune` after a `prune`, or a resumed `run`
        student = saved_pruned_student(out)
        _preflight({"student": student}, inputs.data.example)
    compare = command == "run" and config.evaluate is not None and config.evaluate.compare
    start = copy.deepcopy(student) if compare and runtime.is_main else None  # the baselines start here too
    summary, student = run_finetune(config, out, inputs.teacher, data, student, resume=resume,
                                    progress=progress, runtime=runtime, parts=inputs.parts,
                                    finetuner=inputs.finetuner)
    result = summary.to_json()
    if runtime.is_main and command == "run" and (config.evaluate is not None or config.export is not None):
        result["report"] = str(report_stages(config, out, inputs, student, data, summary, start, progress))
    if runtime.is_main:
        write_model_cards(config, out, summary, reported="report" in result)
    return result


def report_stages(config: Config, out: Path, inputs: JobInputs, student: nn.Module, data: TrainingData,
                  summary: RunSummary, start: nn.Module | None, progress: bool) -> Path:
    """Evaluate (with the baselines), export and benchmark as the config's ``evaluate`` and
    ``export`` sections say; then the report draws what they returned. The path of report.md."""
    evaluation = latency = None
    if config.evaluate is not None:
        evaluation = evaluate_models(config, out, inputs.teacher, student, data, summary, start=start,
                                     parts=inputs.parts, progress=progress)
        save_sample_grids(out, evaluation)
    if config.export is not None:
        latency = export_and_benchmark(config.export, out, inputs.teacher, student)
    pruning = json.loads((out / PRUNING_REPORT).read_text()) if (out / PRUNING_REPORT).is_file() else None
    return write_run_report(out, summary, pruning=pruning, evaluation=evaluation, latency=latency)


def summary_text(summary: dict[str, Any]) -> str:
    keys = ("pruning", "finetuner", "steps", "seconds", "final", "report")
    return json.dumps({k: summary[k] for k in keys if k in summary}, indent=2)
