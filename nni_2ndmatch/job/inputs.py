"""What a job reads, loaded and checked before anything is written to (or deleted from) output_dir:
the runtime, the teacher (and its pipeline's parts), the data plan, a given student, and the strategy."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, ModelSpec
from ..data import collate
from ..errors import UserError, user_errors
from ..evaluation import OnnxFeatures, load_clip, needs_torchmetrics
from ..files import read_json_object
from ..finetuners import Finetuner, get_finetuner, schedule_refusal
from ..method import model_output, own_schedule, prediction_of
from ..models import (
    BUILTIN_PIPELINES,
    TINY_PIPELINES,
    PipelineParts,
    build_builtin,
    conditioning_of,
    is_pipeline_folder,
    load_hub_model,
    load_pipeline_parts,
)
from ..nni import PRUNER_REGISTRY, pruner_spec
from ..pruning import load_model_folder
from ..training import Runtime, check_batch, check_finetuner, check_student_options
from ..training.accelerate import AccelerateRuntime, check_launcher_settings, launched_distributed
from .data import DataPlan, check_resume, plan_data
from .evaluate import baseline_options
from .finetune import make_finetuner


def make_runtime(device: str, timeout_s: float) -> Runtime:
    """The multi-process runtime (Accelerate, DDP) when a launcher started several processes;
    else the single-process one on ``device``. ``timeout_s``: how long a process waits for the others."""
    check_device(device)
    with user_errors("finetune"):
        check_launcher_settings()
    if not launched_distributed():
        return Runtime(device)
    if ":" in device:  # each process takes its local GPU: an index would be ignored
        raise UserError(f"finetune.device: value {device!r} is not allowed with several processes (each takes the "
                        f"GPU of its local rank); allowed: {device.split(':')[0]}")
    with user_errors("finetune"):
        return AccelerateRuntime(device, timeout_s)


def check_device(device: str) -> None:
    """The config's device is one this machine's torch has: an error naming it before any work, not
    a traceback once the pruning is done."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    here = ["cpu", *(["cuda", *(f"cuda:{i}" for i in range(count))] if count else []),
            *(["mps"] if torch.backends.mps.is_available() else [])]
    if device not in here:
        raise UserError(f"finetune.device: value {device!r} is not allowed: this machine's torch "
                        f"({torch.__version__}) has no such device; allowed here: {', '.join(here)}")


def load_configured_model(spec: ModelSpec, role: str) -> nn.Module:
    """A built-in architecture, a Hub model, a pruned-student folder or a diffusers model folder."""
    with user_errors(f"model.{role}", OSError):
        if spec.builtin is not None:
            return build_builtin(spec.builtin, width=spec.width, seed=spec.seed)
        if spec.hub is not None:
            return load_hub_model(spec.hub, spec.subfolder)
        check_folder_schedule(spec.path, role)
        return load_model_folder(spec.path)


def check_folder_schedule(folder: str, role: str) -> None:
    """A model folder is trained on the reference DDPM schedule; one that carries a
    scheduler_config.json of another schedule (flow matching, other betas or prediction) is an
    error rather than a run on the wrong objective."""
    file = Path(folder) / "scheduler_config.json"
    if is_pipeline_folder(folder) or not file.is_file():
        return
    config = read_json_object(file)
    if str(config.get("_class_name", "")).startswith("FlowMatch") or own_schedule(config):
        raise UserError(f"model.{role}: {file} gives the model its own schedule ({config.get('_class_name')}), which "
                        "a model folder's run does not train on (it uses the reference DDPM schedule); allowed: the "
                        "model inside a pipeline folder (model_index.json, scheduler/), whose schedule the run takes, "
                        "or a folder without it")


def load_teacher(spec: ModelSpec, resolution: int) -> tuple[nn.Module, PipelineParts | None]:
    """The teacher, and when it comes from a pipeline (a pipeline folder, or a builtin pipeline
    written for ``resolution`` into a temporary folder that lives as long as the parts) what the
    run takes from that pipeline."""
    with user_errors("model.teacher", OSError):
        if spec.builtin in BUILTIN_PIPELINES:
            folder = tempfile.TemporaryDirectory(prefix=f"nni-2ndmatch-{spec.builtin}-")
            write = TINY_PIPELINES[spec.builtin]
            parts = load_pipeline_parts(write(folder.name, seed=spec.seed, resolution=resolution))
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
    run_options, train = config.finetune.options.model_dump(), config.finetune.train_config()
    for i, (name, given) in enumerate(e.baselines()):  # as it will train, checked before the run trains
        options = baseline_options(name, run_options, given)
        try:
            check_finetuner(get_finetuner(name, scheduler=parts.scheduler if parts is not None else None, **options),
                            train)
        except ValueError as err:
            raise UserError(f"evaluate.compare[{i}]: the baseline {name!r} takes the options {options} (the run's "
                            f"lambda_dsm / lambda_kd and its own), which it cannot train with: {err}") from None
    if e.fid_features is not None:
        try:
            needs_torchmetrics()
            OnnxFeatures(e.fid_features).resolve_width(config.data.resolution, config.data.resolution)
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


def preflight(models: dict[str, nn.Module], item: Any) -> None:
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
    if config.evaluate is not None:  # the main process evaluates: it alone loads the CLIP and FID models
        runtime.on_main(lambda: check_evaluate(config, teacher, parts))
    if parts is not None and config.pruning is not None and pruner_spec(config.pruning.pruner).needs_gradients \
            and prediction_of(parts.scheduler) != "epsilon":
        allowed = [name for name, spec in PRUNER_REGISTRY.items() if not spec.needs_gradients]
        raise UserError(f"pruning.pruner: value {config.pruning.pruner!r} is not allowed: it scores channels by the "
                        "gradients of the noise-prediction loss, and the pipeline predicts "
                        f"{prediction_of(parts.scheduler)}; allowed: {', '.join(allowed)}")
    if config.finetune.validation_prompts is not None and (parts is None or parts.text_encoder is None):
        raise UserError(f"finetune.validation_prompts: value {config.finetune.validation_prompts!r} is not allowed: "
                        "the teacher takes no text prompts (only a text-to-image pipeline does); leave it out")
    plan = plan_data(config, teacher, parts)
    if resume:
        check_resume(config, plan)
    student = load_configured_model(config.model.student, "student") if config.model.student is not None else None
    preflight({"teacher": teacher} if student is None else {"teacher": teacher, "student": student}, plan.example)
    with user_errors("finetune"):
        check_batch(config.finetune.train_config(), plan.items, runtime.world_size)
        check_student_options(student if student is not None else teacher, config.finetune.train_config())
    finetuner = make_finetuner(config, parts)
    refusal = schedule_refusal(finetuner)
    if refusal:
        raise UserError(f"finetune.jac_min_timestep: value {finetuner.opts.jac_min_timestep} is not allowed: {refusal}")
    finetuner.resolve(teacher, tuple(collate([plan.example])[0].shape[1:]))  # e.g. mode: auto
    return JobInputs(teacher, parts, plan, student, finetuner)
