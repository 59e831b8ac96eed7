"""The report of a run: teacher vs student quality (digits-FID, fidelity, sample grids), beside
the pruned student before finetuning and baseline finetuners (``evaluate.compare``), loss curves,
and (when the config exports) latency, MACs and parameters; written to ``OUT/report/``."""

from __future__ import annotations

import copy
import functools
import io
import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import collate
from .deploy import export_onnx
from .deploy.bench import run_benchmark, write_reports
from .evaluation import FID, OnnxFeatures, clip_score, ddim_sample, digits_fid, fidelity, load_clip
from .files import atomic_write_bytes, atomic_write_json, atomic_write_text
from .finetuners import finetuner_options, get_finetuner
from .job.results import RunSummary
from .layout import BASELINES_DIR, METRICS_FILE, PRUNING_REPORT, REPORT_DIR, REPORT_FILE, RESULTS_FILE
from .models.digits import load_digits_classifier
from .pruning import save_model
from .training import Runtime, finetune
from .utils import is_number

logger = logging.getLogger(__name__)

MULTI_SEED_BENCHMARK = "benchmarks/digits_quality.py"
LOSS_TERMS = ("dsm", "kd", "jac")


def _png_bytes(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_grid(images: Tensor, path: Path, columns: int = 10, scale: int = 4) -> None:
    """Images [N, C, H, W] in [-1, 1] as one PNG grid (nearest-neighbour upscaled by ``scale``)."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + 1) + 1, columns * (w + 1) + 1)
    for i, img in enumerate(images.clamp(-1, 1) * 0.5 + 0.5):
        r, col = divmod(i, columns)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = img
    pixels = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


# --- plots ---------------------------------------------------------------------------------------

def loss_weights(finetuner_options: dict[str, Any]) -> dict[str, float]:
    """{term: weight} from a finetuner's options: ``lambda_jac=0.001`` -> {"jac": 0.001}."""
    return {key.removeprefix("lambda_"): float(value) for key, value in finetuner_options.items()
            if key.startswith("lambda_") and is_number(value)}


def weighted_loss_series(records: list[dict[str, Any]],
                         weights: dict[str, float]) -> dict[str, list[tuple[int, float]]]:
    """{label: [(step, value)]} of the total and of each term as it enters it (weight x term,
    labelled e.g. "0.001·jac"); terms of weight 0 are left out, as are values <= 0 (log scale)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for key in ("loss", *dict.fromkeys((*LOSS_TERMS, *weights))):
        weight = 1.0 if key == "loss" else weights.get(key, 1.0)
        if weight == 0:
            continue
        points = [(r["step"], weight * r[key]) for r in records
                  if key in r and math.isfinite(r[key]) and weight * r[key] > 0]
        if points:
            label = "loss (total)" if key == "loss" else key if weight == 1 else f"{weight:g}·{key}"
            series[label] = points
    return series


def save_loss_curves(metrics_file: Path, path: Path, weights: dict[str, float] | None = None) -> None:
    """The total loss of ``metrics.jsonl`` and each term weighted as it enters it, against the
    step (log scale). ``weights``: {term: lambda} (see ``loss_weights``); none: the raw terms."""
    plt = _pyplot()
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for label, points in weighted_loss_series(records, weights or {}).items():
        ax.plot(*zip(*points), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss term as weighted in the total" if weights else "loss term (unweighted)")
    ax.set_title("finetuning loss terms")
    ax.legend()
    atomic_write_bytes(path, _png_bytes(fig))
    plt.close(fig)


def model_sizes_figure(models: dict[str, dict[str, float]]) -> Any:
    """Two panels, MACs per sample and parameters, each teacher vs student on its own axis
    (millions), titled with the student/teacher ratio. ``models``: {teacher|student: {macs, params}}."""
    plt = _pyplot()
    roles = ("teacher", "student")
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.2))
    for ax, (key, title) in zip(axes, (("macs", "MACs per sample"), ("params", "parameters"))):
        values = [models[role][key] / 1e6 for role in roles]
        bars = ax.bar(roles, values, color=["#7f7f7f", "#1f77b4"])
        ax.bar_label(bars, [f"{v:.3g}M" for v in values])
        ax.set_ylim(0, max(values) * 1.18)
        ax.set_ylabel("millions")
        ax.set_title(f"{title}\nstudent / teacher = {values[1] / values[0]:.3f}")
    fig.tight_layout()
    return fig


def save_model_sizes(path: Path, models: dict[str, dict[str, float]]) -> None:
    """``model_sizes_figure`` as a PNG at ``path``."""
    fig = model_sizes_figure(models)
    atomic_write_bytes(path, _png_bytes(fig))
    _pyplot().close(fig)


# --- evaluation ----------------------------------------------------------------------------------

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
        at8 = samples if samples.shape[-1] == 8 else F.interpolate(samples, size=(8, 8), mode="area")
        return digits_fid(at8, self.classifier)

    def score(self, samples: Tensor) -> dict[str, float | None]:
        return {"digits_fid": self.digits_fid(samples), "fidelity": fidelity(samples, self.teacher_samples),
                "fid": self.fid(samples) if self.fid is not None else None,
                "clip_score": clip_score(samples, self.prompts, self.clip) if self.clip is not None else None}


class Evaluator(Scores):
    """Every model samples from one fixed noise with deterministic DDIM and is scored against the
    teacher's samples: fidelity, and digits-FID when the data are the built-in digits (samples are
    resized to the classifier's 8x8 when trained at another resolution); FID with ``fid_features``."""

    def __init__(self, teacher: nn.Module, dataset: Any, *, samples: int, ddim_steps: int, seed: int,
                 digits: bool, fid_features: str | None = None) -> None:
        x0, _ = collate([dataset[0]], torch.device("cpu"))
        self.noise = torch.randn(samples, *x0.shape[1:], generator=torch.Generator().manual_seed(seed))
        self.conditioning = conditioning_rows(dataset, samples)
        self.ddim_steps = ddim_steps
        self.classifier = load_digits_classifier() if digits else None
        self.setup_metrics(fid_features, None, dataset, x0.shape[-1], None)
        self.teacher_samples = self.sample(teacher)

    def sample(self, model: nn.Module) -> Tensor:
        """The model's samples (on the CPU), computed on the model's device."""
        device = next(model.parameters(), torch.empty(0)).device
        cond = {k: v.to(device) for k, v in self.conditioning.items()}
        return ddim_sample(model.eval(), self.noise.to(device), self.ddim_steps, **cond).cpu()


REAL_IMAGES = 10000  # at most this many data images are FID's reference set


class PipelineEvaluator(Scores):
    """A latent pipeline's evaluation: every denoiser samples through the teacher's pipeline (its
    VAE decodes; the conditions are those of the first data items: prompts for its text encoder,
    or class labels for a DiT), with DDIM on the pipeline's schedule, the same seeded initial
    latents per sample and ``guidance_scale``. Scores as :class:`Scores` (FID against the data's
    images, CLIP score against the prompts)."""

    def __init__(self, parts: Any, teacher: nn.Module, data: Any, *, samples: int, ddim_steps: int, seed: int,
                 guidance_scale: float, resolution: int, fid_features: str | None = None,
                 clip_model: str | None = None) -> None:
        from diffusers import DDIMScheduler, DiffusionPipeline

        from .models.pipelines import pipeline_components

        frozen = {"vae": parts.vae, "text_encoder": parts.text_encoder, "tokenizer": parts.tokenizer}
        others = {k: None for k in pipeline_components(parts.path) if k not in (*frozen, parts.denoiser, "scheduler")}
        scheduler = DDIMScheduler.from_config(parts.scheduler.config, clip_sample=False)  # latents are not in [-1, 1]
        self.pipe = DiffusionPipeline.from_pretrained(parts.path, use_safetensors=True, scheduler=scheduler,
                                                      **{parts.denoiser: teacher}, **frozen, **others)
        self.pipe.set_progress_bar_config(disable=True)
        self.denoiser, self.seed, self.resolution = parts.denoiser, seed, resolution
        self.ddim_steps, self.guidance_scale = ddim_steps, guidance_scale
        conditions = data.captions if data.captions is not None else data.labels
        self.conditions = [conditions[i % len(conditions)] for i in range(samples)]
        self.text = data.captions is not None
        self.setup_metrics(fid_features, clip_model, data.source, resolution, self.conditions if self.text else None)
        self.teacher_samples = self.sample(teacher)

    @torch.no_grad()
    def sample(self, model: nn.Module, batch_size: int = 16) -> Tensor:
        """The samples of the pipeline with ``model`` as its denoiser, in [-1, 1] on the CPU."""
        self.pipe.register_modules(**{self.denoiser: model.eval()})
        images = []
        for start in range(0, len(self.conditions), batch_size):
            conditions = self.conditions[start:start + batch_size]
            generators = [torch.Generator().manual_seed(self.seed + start + i) for i in range(len(conditions))]
            given = {"prompt": conditions, "height": self.resolution, "width": self.resolution} if self.text \
                else {"class_labels": conditions}
            out = self.pipe(**given, num_inference_steps=self.ddim_steps, guidance_scale=self.guidance_scale,
                            generator=generators, output_type="pt")
            images.append(out.images.cpu() * 2 - 1)
        return torch.cat(images)


# --- baselines -----------------------------------------------------------------------------------

def baseline_options(name: str, run_options: dict[str, Any]) -> dict[str, Any]:
    """The baseline's options: its defaults, with the run's lambda_dsm / lambda_kd where it takes them."""
    accepted = finetuner_options(name)
    return {k: run_options[k] for k in ("lambda_dsm", "lambda_kd") if k in run_options and k in accepted}


def finetune_baseline(name: str, start: nn.Module, teacher: nn.Module, dataset: Any, config: Any,
                      run_options: dict[str, Any], *, progress: bool, scheduler: Any = None,
                      steps: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``start`` finetuned with the finetuner ``name`` and the run's loop options (the same
    seed: the same data order, noise and timesteps; the run's ``scheduler``), for the run's number
    of steps or ``steps``. Writes no checkpoints."""
    finetuner = get_finetuner(name, scheduler=scheduler, **baseline_options(name, run_options))
    train = config.finetune.train_config()
    if steps is not None:
        train = train.model_copy(update={"steps": steps})
    logger.info("finetuning the baseline %r from the same starting student (%d steps)", name, train.steps)
    result = finetune(copy.deepcopy(start), teacher, finetuner, dataset, train, None,
                      runtime=Runtime(config.finetune.device), progress=progress)
    info = {"finetuner": name, "finetuner_options": finetuner.options(), "steps": result.step,
            "seconds": result.seconds, "final": result.history[-1] if result.history else {}}
    return result.student, info


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def difference_sentence(run: dict[str, Any], baseline: dict[str, Any], seed: int) -> str:
    """One sentence: the run's finetuner vs one baseline, on this run's single seed."""
    parts = []
    for key, label, better in (("digits_fid", "digits-FID", "lower"), ("fid", "FID", "lower"),
                               ("clip_score", "CLIP score", "higher")):
        if run.get(key) is not None and baseline.get(key) is not None:
            parts.append(f"{label} {run[key]:.3f} vs {baseline[key]:.3f} ({run[key] - baseline[key]:+.3f}; "
                         f"{better} is better)")
    parts.append(f"fidelity to the teacher {run['fidelity']:.4f} vs {baseline['fidelity']:.4f} "
                 f"({run['fidelity'] - baseline['fidelity']:+.4f}; lower is closer)")
    return f"With this one finetune seed ({seed}), `{run['finetuner']}` vs {baseline['model']}: {', '.join(parts)}."


def single_seed_caveat() -> str:
    return (f"A single seed is not evidence that either finetuner is better: {MULTI_SEED_BENCHMARK} runs the "
            "paired comparison (same pruned student and noise per seed) over several seeds on the built-in digits.")


def _quality_row(model: str, role: str, finetuner: str | None, scores: dict[str, Any], seconds: float | None,
         samples_png: str) -> dict[str, Any]:
    return {"model": model, "role": role, "finetuner": finetuner, **scores, "finetune_seconds": seconds,
            "samples_png": samples_png}


def compare_models(config: Any, out: Path, student: nn.Module, teacher: nn.Module, dataset: Any,
                   summary: RunSummary, evaluator: Scores, start: nn.Module | None, *,
                   progress: bool, scheduler: Any = None) -> dict[str, Any]:
    """Rows of the quality table (teacher, the starting student before finetuning, each baseline of
    ``evaluate.compare``, the run's student), their sample grids, and the run-vs-baseline sentences."""
    folder = out / REPORT_DIR
    names: list[str] = list(config.evaluate.compare)
    run_name = summary.finetuner
    rows: list[dict[str, Any]] = []

    def add(label: str, role: str, finetuner: str | None, model: nn.Module | None, seconds: float | None,
            png: str) -> dict[str, Any]:
        """A row of the table: ``model``'s samples (the teacher's when None), scored and drawn."""
        samples = evaluator.teacher_samples if model is None else evaluator.sample(model)
        save_grid(samples[:50], folder / png)
        rows.append(_quality_row(label, role, finetuner, evaluator.score(samples), seconds, png))
        return rows[-1]

    add("teacher", "teacher", None, None, None, "samples_teacher.png")
    source = "model.student" if config.model.student is not None else "pruned/"
    if start is None:
        source = "the starting student was not given to the report"
    notes: list[str] = []
    baselines: dict[str, Any] = {}
    shutil.rmtree(folder / BASELINES_DIR, ignore_errors=True)  # the report describes this run only
    if start is None:
        if names:
            notes.append(f"Baselines {', '.join(names)} were not trained: {source}.")
            logger.warning("evaluate.compare: skipping the baselines %s: %s", ", ".join(names), source)
    else:
        label = "pruned, before finetuning" if config.model.student is None else "starting student, before finetuning"
        add(label, "start", None, start, None, "samples_pruned.png")
        for name in names:
            run = functools.partial(finetune_baseline, name, start, teacher, dataset, config,
                                    summary.finetuner_options, progress=progress, scheduler=scheduler)
            baseline, info = run()
            add(f"{name} (baseline)", "baseline", name, baseline, info["seconds"],
                f"samples_baseline_{_safe_name(name)}.png")
            baselines[name] = {**info, "student_dir": _save_baseline(baseline, out, name)}
            if config.evaluate.equal_wallclock:  # as many steps as fit in the run's seconds
                steps = max(1, round(summary.seconds / (info["seconds"] / info["steps"])))
                baseline, info = run(steps=steps)
                add(f"{name} (baseline, {steps} steps: the run's wall clock)", "baseline-wallclock", name, baseline,
                    info["seconds"], f"samples_baseline_{_safe_name(name)}_wallclock.png")
                baselines[f"{name}-wallclock"] = {**info,
                                                  "student_dir": _save_baseline(baseline, out, f"{name}-wallclock")}
    run_row = add(f"{run_name} (this run)", "run", run_name, student, summary.seconds, "samples_student.png")
    if baselines and summary.processes > 1:
        notes.append(f"The run finetuned on {summary.processes} processes, the baselines on one: their "
                     "finetune seconds are not comparable.")
    seed = config.finetune.seed
    sentences = [difference_sentence(run_row, row, seed) for row in rows if row["role"].startswith("baseline")]
    if sentences:
        sentences.append(single_seed_caveat())
    return {"rows": rows, "start": source if start is not None else None, "finetune_seed": seed,
            "baselines": baselines, "sentences": sentences, "notes": notes}


def _save_baseline(model: nn.Module, out: Path, name: str) -> str:
    """The baseline's finetuned student under out/report/baselines/NAME/student (for inspection)."""
    relative = Path(REPORT_DIR) / BASELINES_DIR / _safe_name(name) / "student"
    save_model(model, out / relative)
    return relative.as_posix()


# --- markdown ------------------------------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6})(?=\s)")


def _heading_lines(lines: list[str]) -> list[int]:
    """Indices of the ATX heading lines outside fenced code blocks."""
    found, fenced = [], False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and _HEADING.match(line):
            found.append(i)
    return found


def shift_headings(markdown: str, top: int) -> str:
    """``markdown`` with every heading moved by the same number of levels so that its highest
    heading is at level ``top`` (to embed one document as a section of another)."""
    lines = markdown.splitlines()
    indices = _heading_lines(lines)
    if not indices:
        return markdown
    shift = top - min(len(_HEADING.match(lines[i]).group(1)) for i in indices)
    for i in indices:
        level = len(_HEADING.match(lines[i]).group(1))
        lines[i] = "#" * max(1, min(6, level + shift)) + lines[i][level:]
    return "\n".join(lines)


def quality_lines(quality: dict[str, Any], comparison: dict[str, Any]) -> list[str]:
    lines = ["## Quality (same noise, deterministic DDIM)", "",
             f"{quality['samples']} samples per model, {quality['ddim_steps']} DDIM steps, noise seed "
             f"{quality['seed']}; every finetune from the same starting student with seed "
             f"{comparison['finetune_seed']}.", "",
             ]
    columns = [(k, label) for k, label in (("digits_fid", "digits-FID"), ("fid", "FID"), ("clip_score", "CLIP score"))
               if any(row.get(k) is not None for row in comparison["rows"])]
    lines += ["| model | " + "".join(f"{label} | " for _, label in columns)
              + "fidelity to the teacher (RMS per pixel) | finetune s |", "|---|" + "---:|" * (len(columns) + 2)]
    for row in comparison["rows"]:
        lines.append(f"| {row['model']} | " + "".join(f"{_fmt(row.get(k), '.3f')} | " for k, _ in columns)
                     + f"{row['fidelity']:.4f} | {_fmt(row['finetune_seconds'], '.1f')} |")
    lines.append("")
    if comparison["sentences"]:
        lines += [" ".join(comparison["sentences"]), ""]
    lines += [*(f"Note: {note}" for note in comparison["notes"]), *([""] if comparison["notes"] else [])]
    lines += ["digits-FID: Frechet distance of the built-in digits classifier's features (a domain-specific FID, "
              "not comparable to Inception FID); n/a when the data are not the built-in digits. FID: with the "
              "feature network of evaluate.fid_features, against the data's images; CLIP score: 100 x mean "
              "max(cosine(image, prompt), 0) with evaluate.clip_model.", "",
              "### Samples (same noise)", ""]
    for row in comparison["rows"]:
        lines += [f"{row['model']}:", "", f"![{row['model']}]({row['samples_png']})", ""]
    return lines


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """``results.json`` and ``report.md`` under out/report (the PNGs are written by the steps)."""
    folder = out / REPORT_DIR
    atomic_write_json(folder / RESULTS_FILE, results)
    lines = ["# nni-2ndmatch run report", ""]
    pruning = results.get("pruning")
    if pruning:
        lines += ["## Pruning", "", f"MACs {pruning['macs_before']:.4g} -> {pruning['macs_after']:.4g} "
                  f"({pruning['macs_ratio']:.3f}x), parameters {pruning['params_before']:,} -> "
                  f"{pruning['params_after']:,} ({pruning['params_ratio']:.3f}x)", ""]
    finetune = results.get("finetune")
    if finetune:
        final = ", ".join(f"{k} {v:.4g}" for k, v in finetune.get("final", {}).items() if isinstance(v, float))
        lines += ["## Finetuning", "", f"`{finetune['finetuner']}`, {finetune['steps']} steps in "
                  f"{finetune['seconds']:.0f} s; last logged step: {final}", "",
                  "Each loss term is plotted as it enters the total (weight x term).", "",
                  "![loss curves](loss_curves.png)", ""]
    if results.get("quality") and results.get("comparison"):
        lines += quality_lines(results["quality"], results["comparison"])
    latency = results.get("latency")
    if latency:
        embedded = shift_headings(latency.get("markdown", "").strip(), top=2)
        if not _HEADING.match(embedded):
            lines += ["## Latency", ""]
        lines += [embedded, "", "![latency](latency.png)", "", "![MACs and parameters](macs.png)", ""]
    path = folder / REPORT_FILE
    atomic_write_text(path, "\n".join(lines))
    return path


def run_report(config: Any, out: Path, teacher: nn.Module, student: nn.Module, data: Any,
               summary: RunSummary, *, start: nn.Module | None = None, progress: bool = False,
               parts: Any = None) -> Path:
    """Evaluate, compare, export and benchmark as the config's ``evaluate`` and ``export`` sections
    say; write out/report (report.md, results.json, PNGs). ``data``: the run's ``TrainingData``
    (what it trained on; the images and their conditioning). ``start``: the student before finetuning,
    where the baselines of ``evaluate.compare`` start (without it they are skipped, with a note).
    ``progress``: progress bars for the baseline finetunes. ``parts``: the teacher's pipeline
    (models.PipelineParts) when it is one: its schedule, and for a latent one the sampling through
    it. Returns the path of report.md."""
    folder = out / REPORT_DIR
    results: dict[str, Any] = {"finetune": {"finetuner": summary.finetuner, "steps": summary.steps,
                                            "seconds": summary.seconds, "final": summary.final}}
    if (out / PRUNING_REPORT).is_file():
        pruning = json.loads((out / PRUNING_REPORT).read_text())
        results["pruning"] = {k: v for k, v in pruning.items() if k != "groups"}
    if (out / METRICS_FILE).is_file():
        save_loss_curves(out / METRICS_FILE, folder / "loss_curves.png",
                         loss_weights(summary.finetuner_options))
    if config.evaluate is not None:
        e = config.evaluate
        logger.info("evaluating teacher and student: %d samples each, %d DDIM steps", e.samples, e.ddim_steps)
        digits = config.data.builtin == "digits"
        if parts is not None and parts.latent:
            evaluator = PipelineEvaluator(parts, teacher, data, samples=e.samples, ddim_steps=e.ddim_steps,
                                          seed=e.seed, guidance_scale=e.guidance_scale,
                                          resolution=config.data.resolution, fid_features=e.fid_features,
                                          clip_model=e.clip_model)
        else:
            evaluator = Evaluator(teacher, data.dataset, samples=e.samples, ddim_steps=e.ddim_steps, seed=e.seed,
                                  digits=digits, fid_features=e.fid_features)
        comparison = compare_models(config, out, student, teacher, data.dataset, summary, evaluator, start,
                                    progress=progress, scheduler=parts.scheduler if parts is not None else None)
        rows = {row["role"]: row for row in comparison["rows"]}
        results["quality"] = {"samples": e.samples, "ddim_steps": e.ddim_steps, "seed": e.seed,
                              "fidelity": rows["run"]["fidelity"]}
        for key in ("digits_fid", "fid", "clip_score"):
            if rows["run"].get(key) is not None:
                results["quality"].update({f"{key}_teacher": rows["teacher"][key], f"{key}_student": rows["run"][key]})
        results["comparison"] = comparison
    if config.export is not None:
        results["latency"] = export_and_benchmark(config.export, out, teacher, student)
        results["latency"]["markdown"] = (folder / "latency.md").read_text()
    return write_report(out, results)


def export_and_benchmark(section: Any, out: Path, teacher: nn.Module, student: nn.Module) -> dict[str, Any]:
    """ONNX files of teacher and student (parity-checked) under out/onnx, and their latency on the
    section's backends (out/report/latency.{json,md,png}, macs.png)."""
    onnx = {}
    for role, model in (("teacher", teacher), ("student", student)):
        logger.info("exporting the %s to ONNX (opset %d)", role, section.opset)
        report = export_onnx(model.eval(), out / "onnx" / f"{role}.onnx", opset=section.opset)
        onnx[role] = {"file": f"onnx/{role}.onnx", "max_rel_error": report["parity"]["max_rel_error"]}
    logger.info("benchmarking teacher vs student on %s, batch %s", ", ".join(section.backends), section.batch)
    bench = run_benchmark(teacher, student, backends=section.backends, batches=section.batch, device="cpu",
                          threads=section.threads, repeats=section.repeats,
                          onnx_files={role: out / info["file"] for role, info in onnx.items()})
    write_reports(bench, out / REPORT_DIR / "latency.json")
    save_model_sizes(out / REPORT_DIR / "macs.png", bench["models"])
    rows = [{k: row[k] for k in ("variant", "batch", "speedup", "macs_ratio")} for row in bench["results"]]
    return {"onnx": onnx, "macs_ratio": bench["macs_ratio"], "params_ratio": bench["params_ratio"], "rows": rows}
