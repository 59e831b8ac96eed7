"""The report of a run: teacher vs student quality (digits-FID, fidelity, sample grids), loss
curves, and (when the config exports) latency and MACs bars; written to ``OUT/report/``."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .io import atomic_write_bytes, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

REPORT_DIR = "report"


def _png_bytes(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


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


def save_bars(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> None:
    """A grouped bar chart: {group: {series: value}} (e.g. {batch 1: {teacher: ms, student: ms}})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(next(iter(groups.values())))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups), 3.2))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [groups[k][name] for k in groups], width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    atomic_write_bytes(path, _png_bytes(fig))
    plt.close(fig)


def save_loss_curves(metrics_file: Path, path: Path) -> None:
    """Every logged loss term of ``metrics.jsonl`` against the step (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    keys = [k for k in ("loss", "dsm", "kd", "jac") if any(k in r for r in records)]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r and r[key] > 0]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("finetuning loss terms")
    ax.legend()
    atomic_write_bytes(path, _png_bytes(fig))
    plt.close(fig)


def conditioning_rows(dataset: Any, n: int) -> dict[str, Tensor]:
    """The conditioning of the first n data items (cycled), for sampling conditional models."""
    item = dataset[0]
    if not isinstance(item, dict):
        return {}
    from .training import collate

    _, kwargs = collate([dataset[i % len(dataset)] for i in range(n)], torch.device("cpu"))
    return kwargs


def evaluate_models(teacher: nn.Module, student: nn.Module, dataset: Any, *, samples: int, ddim_steps: int,
                    seed: int, digits: bool) -> tuple[dict[str, Any], Tensor, Tensor]:
    """Teacher and student sample from the same noise with deterministic DDIM: fidelity, and
    digits-FID of both when the data are the built-in digits (samples are resized to the
    classifier's 8x8 when trained at another resolution)."""
    import torch.nn.functional as F

    from .digits import load_digits_classifier
    from .evaluation import ddim_sample, digits_fid, fidelity
    from .training import collate

    x0, _ = collate([dataset[0]], torch.device("cpu"))
    noise = torch.randn(samples, *x0.shape[1:], generator=torch.Generator().manual_seed(seed))
    cond = conditioning_rows(dataset, samples)
    teacher_samples = ddim_sample(teacher.eval(), noise, ddim_steps, **cond)
    student_samples = ddim_sample(student.eval(), noise, ddim_steps, **cond)
    results: dict[str, Any] = {"samples": samples, "ddim_steps": ddim_steps, "seed": seed,
                               "fidelity": fidelity(student_samples, teacher_samples)}
    if digits:
        def at8(x: Tensor) -> Tensor:
            return x if x.shape[-1] == 8 else F.interpolate(x, size=(8, 8), mode="area")

        classifier = load_digits_classifier()
        results["digits_fid_teacher"] = digits_fid(at8(teacher_samples), classifier)
        results["digits_fid_student"] = digits_fid(at8(student_samples), classifier)
    return results, teacher_samples, student_samples


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """``results.json`` and ``report.md`` under out/report (the PNGs are written by the steps)."""
    folder = out / REPORT_DIR
    atomic_write_json(folder / "results.json", results)
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
                  f"{finetune['seconds']:.0f} s; last logged step: {final}", "", "![loss curves](loss_curves.png)", ""]
    quality = results.get("quality")
    if quality:
        lines += ["## Quality (same noise, deterministic DDIM)", "",
                  f"{quality['samples']} samples, {quality['ddim_steps']} DDIM steps.", "",
                  "| | digits-FID | fidelity to the teacher (RMS per pixel) |", "|---|---|---|"]
        fid_t, fid_s = quality.get("digits_fid_teacher"), quality.get("digits_fid_student")
        lines.append(f"| teacher | {'n/a' if fid_t is None else f'{fid_t:.3f}'} | 0 |")
        lines.append(f"| student | {'n/a' if fid_s is None else f'{fid_s:.3f}'} | {quality['fidelity']:.4f} |")
        lines += ["", "digits-FID: Frechet distance of the built-in digits classifier's features (a "
                  "domain-specific FID, not comparable to Inception FID).", "",
                  "Teacher samples:", "", "![teacher](samples_teacher.png)", "",
                  "Student samples (same noise):", "", "![student](samples_student.png)", ""]
    latency = results.get("latency")
    if latency:
        lines += ["## Latency", "", latency.get("markdown", ""), "", "![latency](latency.png)", "",
                  "![MACs](macs.png)", ""]
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def run_report(config: Any, out: Path, teacher: nn.Module, student: nn.Module, dataset: Any,
               summary: dict[str, Any]) -> Path:
    """Evaluate, export and benchmark as the config's ``evaluate`` and ``export`` sections say;
    write out/report (report.md, results.json, PNGs). Returns the path of report.md."""
    folder = out / REPORT_DIR
    results: dict[str, Any] = {"finetune": {k: summary[k] for k in ("finetuner", "steps", "seconds", "final")}}
    if (out / "pruning_report.json").is_file():
        pruning = json.loads((out / "pruning_report.json").read_text())
        results["pruning"] = {k: v for k, v in pruning.items() if k != "groups"}
    if (out / "metrics.jsonl").is_file():
        save_loss_curves(out / "metrics.jsonl", folder / "loss_curves.png")
    if config.evaluate is not None:
        e = config.evaluate
        logger.info("evaluating teacher and student: %d samples each, %d DDIM steps", e.samples, e.ddim_steps)
        digits = config.data.builtin == "digits"
        quality, teacher_samples, student_samples = evaluate_models(
            teacher, student, dataset, samples=e.samples, ddim_steps=e.ddim_steps, seed=e.seed, digits=digits)
        results["quality"] = quality
        save_grid(teacher_samples[:50], folder / "samples_teacher.png")
        save_grid(student_samples[:50], folder / "samples_student.png")
    if config.export is not None:
        results["latency"] = export_and_benchmark(config.export, out, teacher, student)
        results["latency"]["markdown"] = (folder / "latency.md").read_text()
    return write_report(out, results)


def export_and_benchmark(section: Any, out: Path, teacher: nn.Module, student: nn.Module) -> dict[str, Any]:
    """ONNX files of teacher and student (parity-checked) under out/onnx, and their latency on the
    section's backends (out/report/latency.{json,md,png}, macs.png)."""
    from .deploy import export_onnx
    from .deploy.bench import run_benchmark, write_reports

    onnx = {}
    for role, model in (("teacher", teacher), ("student", student)):
        logger.info("exporting the %s to ONNX (opset %d)", role, section.opset)
        report = export_onnx(model.eval(), out / "onnx" / f"{role}.onnx", opset=section.opset)
        onnx[role] = {"file": f"onnx/{role}.onnx", "max_rel_error": report["parity"]["max_rel_error"]}
    logger.info("benchmarking teacher vs student on %s, batch %s", ", ".join(section.backends), section.batch)
    bench = run_benchmark(teacher, student, backends=section.backends, batches=section.batch, device="cpu",
                          threads=section.threads, repeats=section.repeats)
    write_reports(bench, out / REPORT_DIR / "latency.json")
    models = bench["models"]
    save_bars(out / REPORT_DIR / "macs.png", "MACs per sample and parameters (millions)",
              {"MACs": {r: models[r]["macs"] / 1e6 for r in ("teacher", "student")},
               "parameters": {r: models[r]["params"] / 1e6 for r in ("teacher", "student")}}, "millions")
    rows = [{k: row[k] for k in ("variant", "batch", "speedup", "macs_ratio")} for row in bench["results"]]
    return {"onnx": onnx, "macs_ratio": bench["macs_ratio"], "params_ratio": bench["params_ratio"], "rows": rows}
