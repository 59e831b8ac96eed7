"""The evaluation stage of a run: every model samples from the same noise and is scored against
the teacher's samples (fidelity; digits-FID, FID and CLIP score where configured), beside the
student before finetuning and the baseline finetuners of ``evaluate.compare``, each trained from
that same student with the run's loop options. Returns :class:`Evaluation`; the report draws it."""

from __future__ import annotations

import copy
import functools
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config, EvaluateSection
from ..data import collate
from ..evaluation import FID, FID_DATA, OnnxFeatures, clip_score, digits_fid, fidelity, load_clip, sample
from ..finetuners import finetuner_options, get_finetuner, jac_every_refusal
from ..layout import BASELINES_DIR, REPORT_DIR
from ..method import is_flow_matching
from ..models import PipelineParts
from ..pruning import save_model
from ..scoped import seeded_generator
from ..training import Runtime, Watch, finetune
from .data import TrainingData
from .results import Comparison, Evaluation, RunSummary

logger = logging.getLogger(__name__)

GRID = 50  # samples per model drawn in the report


def conditioning_rows(dataset: Any, n: int) -> dict[str, Tensor]:
    """The conditioning of the first n data items (cycled), for sampling conditional models."""
    item = dataset[0]
    if not isinstance(item, dict):
        return {}
    _, kwargs = collate([dataset[i % len(dataset)] for i in range(n)], torch.device("cpu"))
    return kwargs


class Scores:
    """The scores every evaluator gives a model's samples: fidelity to the teacher's samples, and
    where configured digits-FID, FID with a local feature network against the data's images, and
    CLIP score against the prompts."""

    teacher_samples: Tensor
    classifier: nn.Module | None = None
    fid_data: str = "digits"  # the built-in data whose digits-FID ``classifier`` gives
    fid: FID | None = None
    clip: Any = None
    prompts: list[str] | None = None

    def setup_metrics(self, fid_features: str | None, clip_model: str | None, images: Any, resolution: int,
                      prompts: list[str] | None) -> None:
        """``images``: the data's images (items, or dicts with "sample"), FID's reference set (up to REAL_IMAGES)."""
        if fid_features is not None:
            n = min(len(images), REAL_IMAGES)
            real = (collate([images[i] for i in range(start, min(start + 64, n))], torch.device("cpu"))[0]
                    for start in range(0, n, 64))
            self.fid = FID(OnnxFeatures(fid_features), real, (resolution, resolution))
        if clip_model is not None:
            self.clip, self.prompts = load_clip(clip_model), prompts

    def digits_fid(self, samples: Tensor) -> float | None:
        if self.classifier is None:
            return None
        return digits_fid(samples, self.classifier, self.fid_data)

    def score(self, samples: Tensor) -> dict[str, float | None]:
        return {"digits_fid": self.digits_fid(samples), "fidelity": fidelity(samples, self.teacher_samples),
                "fid": self.fid(samples) if self.fid is not None else None,
                "clip_score": clip_score(samples, self.prompts, self.clip) if self.clip is not None else None}


class Evaluator(Scores):
    """Every model samples from one fixed noise with deterministic DDIM (on ``scheduler``'s schedule,
    a pixel-space pipeline's, where it has its own; its Euler sampler under flow matching) and is
    scored against the teacher's samples: fidelity, and digits-FID when the data are built-in
    (``digits``: "digits" or "mnist"; samples are resized to the classifier's 8x8 or 28x28 when
    trained at another resolution); FID with ``fid_features``."""

    def __init__(self, teacher: nn.Module, dataset: Any, *, samples: int, ddim_steps: int, seed: int,
                 digits: str | None, fid_features: str | None = None, scheduler: Any = None) -> None:
        x0, _ = collate([dataset[0]], torch.device("cpu"))
        self.noise = torch.randn(samples, *x0.shape[1:], generator=seeded_generator(seed))
        self.conditioning = conditioning_rows(dataset, samples)
        self.ddim_steps, self.scheduler = ddim_steps, scheduler
        if digits is not None:
            self.fid_data, self.classifier = digits, FID_DATA[digits][2]()
        self.setup_metrics(fid_features, None, dataset, x0.shape[-1], None)
        self.teacher_samples = self.sample(teacher)

    def sample(self, model: nn.Module) -> Tensor:
        """The model's samples (on the CPU), computed on the model's device."""
        device = next(model.parameters(), torch.empty(0)).device
        cond = {k: v.to(device) for k, v in self.conditioning.items()}
        return sample(model.eval(), self.noise.to(device), self.ddim_steps, self.scheduler, **cond).cpu()


REAL_IMAGES = 10000  # at most this many data images are FID's reference set


class PipelineEvaluator(Scores):
    """A latent pipeline's evaluation: every denoiser samples through the teacher's pipeline (its
    VAE decodes; the conditions are those of the first data items: prompts for its text encoder,
    or class labels for a DiT), with DDIM on the pipeline's schedule (a flow-matching pipeline: its
    own Euler sampler, deterministic), the same seeded initial
    latents per sample and ``guidance_scale``, as the ``section`` says; ``prompts`` replace the
    data's captions. Scores as :class:`Scores` (FID against the data's images, CLIP score against
    the prompts)."""

    def __init__(self, parts: PipelineParts, teacher: nn.Module, data: TrainingData, section: EvaluateSection,
                 resolution: int, prompts: list[str] | None = None) -> None:
        from diffusers import DDIMScheduler, DiffusionPipeline

        from ..models.pipelines import null_components, pipeline_components

        frozen = parts.frozen
        others = {k: None for k in pipeline_components(parts.path) if k not in (*frozen, parts.denoiser, "scheduler")}
        others.update(null_components(parts.path))
        if is_flow_matching(parts.scheduler):  # deterministic already: the pipeline's flow-matching Euler
            scheduler = type(parts.scheduler).from_config(parts.scheduler.config)
        else:
            scheduler = DDIMScheduler.from_config(parts.scheduler.config, clip_sample=False)  # latents: not in [-1, 1]
        self.pipe = DiffusionPipeline.from_pretrained(parts.path, use_safetensors=True, scheduler=scheduler,
                                                      **{parts.denoiser: teacher}, **frozen, **others)
        self.pipe.set_progress_bar_config(disable=True)
        self.denoiser, self.seed, self.resolution = parts.denoiser, section.seed, resolution
        self.ddim_steps, self.guidance_scale = section.ddim_steps, section.guidance_scale
        conditions = prompts or (data.captions if data.captions is not None else data.labels)
        self.conditions = [conditions[i % len(conditions)] for i in range(section.samples)]
        self.text = data.captions is not None
        self.setup_metrics(section.fid_features, section.clip_model, data.source, resolution,
                           self.conditions if self.text else None)
        self.teacher_samples = self.sample(teacher)

    @torch.no_grad()
    def sample(self, model: nn.Module, batch_size: int = 16) -> Tensor:
        """The samples of the pipeline with ``model`` as its denoiser, in [-1, 1] on the CPU."""
        self.pipe.register_modules(**{self.denoiser: model.eval()})
        images = []
        for start in range(0, len(self.conditions), batch_size):
            conditions = self.conditions[start:start + batch_size]
            generators = [seeded_generator(self.seed + start + i) for i in range(len(conditions))]
            given = {"prompt": conditions, "height": self.resolution, "width": self.resolution} if self.text \
                else {"class_labels": conditions}
            out = self.pipe(**given, num_inference_steps=self.ddim_steps, guidance_scale=self.guidance_scale,
                            generator=generators, output_type="pt")
            images.append(out.images.cpu() * 2 - 1)
        return torch.cat(images)


# --- baselines ---------------------------------------------------------------------------------

def baseline_options(name: str, run_options: dict[str, Any], given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The baseline's options: its defaults, with the run's lambda_dsm / lambda_kd where it takes them,
    and the options ``evaluate.compare`` gives it (``given``) over both."""
    accepted = finetuner_options(name)
    return {**{k: run_options[k] for k in ("lambda_dsm", "lambda_kd") if k in run_options and k in accepted},
            **(given or {})}


def baseline_label(name: str, given: dict[str, Any]) -> str:
    """The baseline's name in the report: the finetuner, and the options ``evaluate.compare`` gave it."""
    return f"{name} with {', '.join(f'{k} {v}' for k, v in given.items())}" if given else name


def finetune_baseline(name: str, start: nn.Module, teacher: nn.Module, dataset: Any, config: Config,
                      run_options: dict[str, Any], *, progress: bool, scheduler: Any = None,
                      steps: int | None = None,
                      given: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``start`` finetuned with the finetuner ``name`` (its options: :func:`baseline_options`)
    and the run's loop options (the same seed: the same data order, noise and timesteps; the run's
    ``scheduler``), for the run's number of steps or ``steps``. Writes no checkpoints."""
    finetuner = get_finetuner(name, scheduler=scheduler, **baseline_options(name, run_options, given))
    train = config.finetune.train_config()
    if steps is not None:
        train = train.model_copy(update={"steps": steps})
    logger.info("finetuning the baseline %r from the same starting student (%d steps)", name, train.steps)
    result = finetune(copy.deepcopy(start), teacher, finetuner, dataset, train, None,
                      runtime=Runtime(config.finetune.device), watch=Watch(progress=progress))
    info = {"finetuner": name, "finetuner_options": finetuner.options(), "steps": result.step,
            "seconds": result.seconds, "final": result.history[-1] if result.history else {}}
    return result.student, info


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def evaluate_models(config: Config, out: Path, teacher: nn.Module, student: nn.Module, data: TrainingData,
                    summary: RunSummary, *, start: nn.Module | None, parts: PipelineParts | None,
                    progress: bool) -> Evaluation:
    """The quality table as ``config.evaluate`` asks: the teacher, the starting student before
    finetuning, each baseline of ``evaluate.compare`` (and at the run's wall clock with
    ``equal_wallclock``), the run's student. ``start``: where the baselines start (None: they are
    skipped, with a note). The baselines' students go to out/report/baselines/NAME/student."""
    e = config.evaluate
    sampler = "flow-matching Euler" if parts is not None and is_flow_matching(parts.scheduler) else "DDIM"
    logger.info("evaluating teacher and student: %d samples each, %d %s steps", e.samples, e.ddim_steps, sampler)
    if parts is not None and parts.latent:
        evaluator: Scores = PipelineEvaluator(parts, teacher, data, e, config.data.resolution)
    else:
        evaluator = Evaluator(teacher, data.dataset, samples=e.samples, ddim_steps=e.ddim_steps, seed=e.seed,
                              digits=config.data.builtin, fid_features=e.fid_features,
                              scheduler=parts.scheduler if parts is not None else None)
    rows: list[dict[str, Any]] = []
    grids: dict[str, Tensor] = {}

    def add(label: str, role: str, finetuner: str | None, model: nn.Module | None, seconds: float | None,
            png: str) -> dict[str, Any]:
        """A row of the table: ``model``'s samples (the teacher's when None), scored."""
        samples = evaluator.teacher_samples if model is None else evaluator.sample(model)
        grids[png] = samples[:GRID]
        rows.append({"model": label, "role": role, "finetuner": finetuner, **evaluator.score(samples),
                     "finetune_seconds": seconds, "samples_png": png})
        return rows[-1]

    add("teacher", "teacher", None, None, None, "samples_teacher.png")
    notes, baselines, entries = [], {}, e.baselines()
    names = [name for name, _ in entries]
    shutil.rmtree(out / REPORT_DIR / BASELINES_DIR, ignore_errors=True)  # the report describes this run only
    if start is None:
        if names:
            notes.append(f"Baselines {', '.join(names)} were not trained: the starting student was not given "
                         "to the report.")
            logger.warning("evaluate.compare: skipping the baselines %s: no starting student", ", ".join(names))
    else:
        label = "pruned, before finetuning" if config.model.student is None else "starting student, before finetuning"
        add(label, "start", None, start, None, "samples_pruned.png")
        scheduler = parts.scheduler if parts is not None else None
        for name, given in entries:
            run = functools.partial(finetune_baseline, name, start, teacher, data.dataset, config,
                                    summary.finetuner_options, progress=progress, scheduler=scheduler, given=given)
            baseline, info = run()
            label = baseline_label(name, given)
            add(f"{label} (baseline)", "baseline", name, baseline, info["seconds"],
                f"samples_baseline_{_safe_name(name)}.png")
            baselines[name] = {**info, "student_dir": _save_baseline(baseline, out, name)}
            steps = summary.equal_time_steps(info["seconds"] / info["steps"]) if e.equal_wallclock else 0
            every = info["finetuner_options"].get("jac_every", 1)
            if steps and jac_every_refusal(every, steps):
                notes.append(f"{label} was not trained for the run's wall clock, which buys it fewer steps ({steps}) "
                             f"than its jac_every ({every}): its term would never be computed.")
            elif steps:  # as many steps as fit in the run's training seconds (on all its processes)
                baseline, info = run(steps=steps)
                add(f"{label} (baseline, {steps} steps: {_wallclock(summary.processes)})", "baseline-wallclock", name,
                    baseline, info["seconds"], f"samples_baseline_{_safe_name(name)}_wallclock.png")
                baselines[f"{name}-wallclock"] = {**info,
                                                  "student_dir": _save_baseline(baseline, out, f"{name}-wallclock")}
    add(f"{summary.finetuner} (this run)", "run", summary.finetuner, student, summary.training_seconds,
        "samples_student.png")
    if baselines and summary.processes > 1:
        notes.append(f"The run finetuned on {summary.processes} processes, the baselines on one: their "
                     "finetune seconds are not comparable."
                     + (f" At equal wall clock a baseline trained for the run's training seconds times its "
                        f"{summary.processes} processes (the same hardware time), which supposes that it would "
                        "scale linearly over processes." if e.equal_wallclock else ""))
    comparison = Comparison(rows=rows, start=None if start is None else
                            ("model.student" if config.model.student is not None else "pruned/"),
                            finetune_seed=config.finetune.seed, baselines=baselines, notes=notes)
    return Evaluation(samples=e.samples, ddim_steps=e.ddim_steps, seed=e.seed, comparison=comparison, grids=grids,
                      sampler=sampler)


def _wallclock(processes: int) -> str:
    return "the run's wall clock" if processes == 1 else f"the run's wall clock x {processes} processes"


def _save_baseline(model: nn.Module, out: Path, name: str) -> str:
    """The baseline's finetuned student under out/report/baselines/NAME/student (for inspection)."""
    relative = Path(REPORT_DIR) / BASELINES_DIR / _safe_name(name) / "student"
    save_model(model, out / relative)
    return relative.as_posix()
