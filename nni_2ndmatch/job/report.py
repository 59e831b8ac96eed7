"""The report of a run: it draws what the stages returned (``job.results``: the run summary, the
evaluation with its baselines, the latency) under ``OUT/report/``: report.md, results.json, sample
grids, loss curves, latency and model-size figures. It trains, samples and measures nothing."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..deploy.bench.report import write_reports
from ..files import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..layout import METRICS_FILE, REPORT_DIR, REPORT_FILE, RESULTS_FILE
from .results import Evaluation, Latency, RunSummary

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
    step (log scale). ``weights``: {term: lambda} (a finetuner's ``weights()``); none: the raw terms."""
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


#: What the equal-compute experiment (docs/results.md, its rule written before the runs) found, as its
#: verdict records it (benchmarks/results/equal_compute/verdict.json; a test holds the two together).
#: Gains are kd's digits-FID minus the setting's (positive: the setting is better), pooled over the
#: teachers: [mean, 95% interval low, high, Holm-adjusted one-sided p]; fidelity: kd's RMS distance
#: from the teacher's samples minus the variant's (positive: the variant's are closer); cost: the
#: variant's whole-run cost per step against kd's, lowest and highest over the teachers.
EQUAL_COMPUTE: dict[str, Any] = {
    "recommended": "kd", "teachers": 3, "pairs": 32,
    "equal_compute": {"2ndmatch": [-2.3, -3.72, -0.88, 1.0], "2ndmatch-every8": [-0.14, -1.39, 1.12, 1.0],
                      "kd-perturb": [0.4, -1.25, 2.05, 0.94]},
    "equal_steps": [2.59, 1.47, 3.71, 5.1e-05],
    "fidelity": {"equal_steps": 0.0255, "equal_compute": 0.0096},
    "cost": [2.05, 2.14]}
#: the experiment's settings, in a config file's words
SETTINGS = {"2ndmatch": "the variant (`2ndmatch` with jac_match vector, jac_weighting noise, lambda_jac 1.0, "
                        "jac_reference_dims 1)",
            "2ndmatch-every8": "the variant with `jac_every: 8`",
            "kd-perturb": "kd at perturbed inputs (`kd_perturb: noise`)"}


def equal_compute_sentence() -> str:
    """Which finetuner the equal-compute rule recommends, and what the Jacobian term buys at what price."""
    def gain(g: list[float]) -> str:
        return f"{g[0]:+.2f} (95% CI {g[1]:+.2f} to {g[2]:+.2f}, Holm p {g[3]:.2g})"

    v, (low, high) = EQUAL_COMPUTE, EQUAL_COMPUTE["cost"]
    compute = "; ".join(f"{SETTINGS[name]} {gain(g)}" for name, g in v["equal_compute"].items())
    closer = {budget: f"{'closer to' if f > 0 else 'farther from'} the teacher's by {abs(f):.4f} RMS"
              for budget, f in v["fidelity"].items()}
    return (f"For a fixed budget, the equal-compute experiment ({v['teachers']} teachers, {v['pairs']} paired seeds, "
            f"its rule written before the runs; docs/results.md) recommends `{v['recommended']}`. Digits-FID gain "
            f"over kd given the same compute (positive: better than kd): {compute}. What the Jacobian term buys: at "
            f"equal steps the variant gains {gain(v['equal_steps'])} and its samples are {closer['equal_steps']} "
            f"({closer['equal_compute']} at equal compute), at {low:.2f}x to {high:.2f}x the cost of a kd step.")


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
    sampler = quality.get("sampler", "DDIM")
    lines = [f"## Quality (same noise, deterministic {sampler})", "",
             f"{quality['samples']} samples per model, {quality['ddim_steps']} {sampler} steps, noise seed "
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
    """``results.json`` and ``report.md`` under out/report (the figures they link are drawn apart)."""
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


def save_sample_grids(out: Path, evaluation: Evaluation) -> None:
    """Each model's first samples as a grid under out/report (drawn as soon as they exist, so that a
    failed export leaves them)."""
    for png, samples in evaluation.grids.items():
        save_grid(samples, out / REPORT_DIR / png)


def write_run_report(out: Path, summary: RunSummary, *, pruning: dict[str, Any] | None = None,
                     evaluation: Evaluation | None = None, latency: Latency | None = None) -> Path:
    """Draw what the stages returned under out/report: loss curves (from the run's metrics), latency
    and model-size figures, results.json and report.md (the sample grids: :func:`save_sample_grids`).
    Returns the path of report.md."""
    folder = out / REPORT_DIR
    results: dict[str, Any] = {"finetune": {"finetuner": summary.finetuner, "steps": summary.steps,
                                            "seconds": summary.seconds, "overhead_seconds": summary.overhead_seconds,
                                            "final": summary.final}}
    if pruning is not None:
        results["pruning"] = {k: v for k, v in pruning.items() if k != "groups"}
    if (out / METRICS_FILE).is_file():
        save_loss_curves(out / METRICS_FILE, folder / "loss_curves.png", summary.loss_weights)
    if evaluation is not None:
        comparison = evaluation.comparison
        run = comparison.row("run")
        sentences = [difference_sentence(run, row, comparison.finetune_seed) for row in comparison.rows
                     if row["role"].startswith("baseline")]
        results["quality"] = evaluation.quality()
        if sentences:
            sentences += [single_seed_caveat(), equal_compute_sentence()]
        fields = dataclasses.asdict(comparison)
        notes = fields.pop("notes")
        results["comparison"] = {**fields, "sentences": sentences, "notes": notes}  # the order of before
    if latency is not None:
        write_reports(latency.bench, folder / "latency.json")
        save_model_sizes(folder / "macs.png", latency.bench["models"])
        results["latency"] = {**latency.summary(), "markdown": (folder / "latency.md").read_text()}
    return write_report(out, results)
