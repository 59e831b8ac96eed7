"""The benchmark's results as Markdown and a bar chart, written beside its JSON."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from ...files import atomic_write_bytes, write_results
from .results import BenchResults


def _device_line(results: BenchResults) -> str:
    env = results["environment"]
    where = env["gpu"] or f"{env['cpu']} ({env['cpu_count']} cores)"
    return (f"{where}; {env['threads']} CPU thread(s); torch {env['torch']}, onnxruntime {env['onnxruntime']}"
            + (f", TensorRT {env['tensorrt']}" if env.get("tensorrt") else ""))


def render_markdown(results: BenchResults) -> str:
    """A Markdown table of the results (medians, p90/p99, throughput, ratios)."""
    t, s = results["models"]["teacher"], results["models"]["student"]
    setup = results["setup"]
    lines = [
        "# Latency: dense teacher vs pruned student", "",
        f"Device: {_device_line(results)}.",
        (f"Teacher: {t.get('class', '?')}, {t['macs'] / 1e9:.3g} GMACs, {t['params'] / 1e6:.3g}M parameters. "
         f"Student: {s['macs'] / 1e9:.3g} GMACs ({results['macs_ratio']:.3f}x), {s['params'] / 1e6:.3g}M "
         f"parameters ({results['params_ratio']:.3f}x)."),
        (f"{setup['repeats']} interleaved runs per model after {setup['warmup']} warm-up runs; latency per call "
         "(one batch) in ms: median / p90 / p99."), "",
        ("| backend | batch | teacher ms | student ms | teacher samples/s | student samples/s | latency ratio "
         "| speedup | MACs ratio | params ratio | speedup / MACs speedup |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["results"]:
        a, b = r["teacher"], r["student"]
        lines.append(f"| {r['variant']} | {r['batch']} | {a['median_ms']:.2f} / {a['p90_ms']:.2f} / {a['p99_ms']:.2f} "
                     f"| {b['median_ms']:.2f} / {b['p90_ms']:.2f} / {b['p99_ms']:.2f} | {a['samples_per_s']:.1f} "
                     f"| {b['samples_per_s']:.1f} | {r['latency_ratio']:.3f} | {r['speedup']:.2f}x "
                     f"| {r['macs_ratio']:.3f} | {r['params_ratio']:.3f} | {r['speedup_vs_macs']:.2f} |")
    if results["skipped"]:
        lines += ["", "Not measured here:"] + [f"- {s['variant']}: {s['reason']}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"


def plot(results: BenchResults, path: str | os.PathLike) -> None:
    """A bar chart of median latencies (PNG)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["results"]
    labels = [f"{r['variant']}\nbatch {r['batch']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows)), 4.5))
    for offset, role, color in ((-0.2, "teacher", "#7f7f7f"), (0.2, "student", "#1f77b4")):
        ax.bar(x + offset, [r[role]["median_ms"] for r in rows], 0.4, label=role, color=color)
    for i, r in enumerate(rows):
        ax.annotate(f"{r['speedup']:.2f}x\n(MACs {1 / r['macs_ratio']:.2f}x)", (i + 0.2, r["student"]["median_ms"]),
                    ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    top = max(r["teacher"]["median_ms"] for r in rows)
    ax.set_ylim(top=top * 3)  # room for the labels
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("median latency per call (ms, log scale)")
    ax.set_title(f"Teacher vs pruned student\n{_device_line(results)}", fontsize=9)
    ax.legend()
    fig.tight_layout()

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def write_reports(results: BenchResults, out: str | os.PathLike) -> list[Path]:
    """``out`` (JSON), and beside it the same name with .md and .png; returns the paths written."""
    out = Path(out)
    write_results(out, results, render_markdown(results))
    plot(results, out.with_suffix(".png"))
    return [out, out.with_suffix(".md"), out.with_suffix(".png")]
