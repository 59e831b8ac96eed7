"""Latency of a dense teacher and its pruned student on each backend, measured side by side.

Per backend variant and batch size, both models get the same random inputs, already on the
device; after ``warmup`` uncounted calls each, teacher and student calls alternate (their order
flips every round) for ``repeats`` rounds in one process. CPU and onnxruntime calls are timed by
the wall clock (they return when done), torch-CUDA and TensorRT calls by CUDA events.

Variants: ``torch``: torch-cpu-fp32 on CPU; torch-cuda-fp32 (eager) and torch-cuda-fp16-cudagraph
on a GPU. ``torch-compile``: torch.compile in this process, torch-compile-cpu-fp32 on CPU,
torch-compile-cuda-fp16 (CUDA graphs) on a GPU. ``aoti``: an AOTInductor package per model (see
:mod:`.aoti`), aoti-cpu-fp32 or aoti-cuda-fp16. ``onnxruntime``: onnxruntime-cpu on CPU;
onnxruntime-cuda, onnxruntime-cuda-fp16 (the float16 export, float32 I/O, run in a CUDA graph) and
onnxruntime-tensorrt on a GPU where those execution providers are installed (and really obtained
by the session; inputs and output bound to CUDA memory). Each variant is one registration in
``VARIANTS`` (``register_variant``).
``tensorrt``: tensorrt-fp16 or -fp32 engines (GPU). A variant that cannot run here is listed
under ``skipped`` with the reason.

The results (JSON) have the shape of :class:`BenchResults`. Modules: ``variants`` (the registry
and the :class:`Setup`), ``timing``, ``results`` (the types and rows), ``report`` (Markdown, chart).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...scoped import torch_threads
from ..errors import DeployError, ExportError, MissingBackendError, ParityError
from ..model_io import input_specs, macs_params
from .report import plot, render_markdown, write_reports
from .results import (
    DEVICES,
    ROLES,
    BenchResults,
    BenchRow,
    BenchSetup,
    LatencyStats,
    Skipped,
    result_row,
    summarize,
)
from .timing import environment, measure
from .variants import (
    VARIANTS,
    Setup,
    Subject,
    Unavailable,
    Variant,
    VariantSpec,
    backends_on,
    register_variant,
    select,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEVICES", "ROLES", "VARIANTS", "BenchResults", "BenchRow", "BenchSetup", "LatencyStats", "Setup", "Skipped",
    "Subject", "Unavailable", "Variant", "VariantSpec", "backends_on", "environment", "measure", "plot",
    "register_variant", "render_markdown", "result_row", "run_benchmark", "select", "summarize", "write_reports",
]


def run_benchmark(teacher: nn.Module, student: nn.Module, setup: Setup | None = None, *,
                  teacher_info: dict[str, Any] | None = None, student_info: dict[str, Any] | None = None,
                  onnx_files: dict[str, Path] | None = None, **options: Any) -> BenchResults:
    """Measure ``teacher`` and ``student`` on every variant of ``setup.backends``; returns the
    results (:class:`BenchResults`). ``setup``: a :class:`Setup`, or its fields as keywords
    (``backends=["torch"], batches=[4]``). ``*_info``: what to record of each model (its source);
    ``onnx_files``: fp32 ONNX files already exported from the two models ({"teacher": path,
    "student": path}), used instead of new exports."""
    if setup is not None and options:
        raise DeployError(f"give a Setup or its fields, not both (got also {', '.join(options)})")
    setup = setup if setup is not None else Setup(**options)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if setup.device == "auto" else setup.device
    subjects = {role: Subject(role, m.eval(), input_specs(m, setup.seq_len), setup.seed, setup.exporter,
                              {"onnx": Path(onnx_files[role])} if onnx_files else {})
                for role, m in zip(ROLES, (teacher, student))}
    if subjects["teacher"].specs != subjects["student"].specs:
        raise DeployError(f"teacher and student take different inputs: {subjects['teacher'].specs} vs "
                          f"{subjects['student'].specs}")
    models = {}
    for role, info in zip(ROLES, (teacher_info, student_info)):
        macs, params = macs_params(subjects[role].model, subjects[role].specs)
        models[role] = {**(info or {"class": type(subjects[role].model).__name__}), "macs": macs, "params": params}
    macs_ratio = models["student"]["macs"] / models["teacher"]["macs"]
    params_ratio = models["student"]["params"] / models["teacher"]["params"]
    env = environment(device, setup.threads)
    workdir = tempfile.TemporaryDirectory(prefix="nni2ndmatch-bench-", dir=setup.workdir)
    with torch_threads(setup.threads), workdir as tmp:
        setup = setup.on(device, Path(tmp))
        variants, skipped = select(setup)
        rows = _measure_all(setup, subjects, variants, skipped, macs_ratio, params_ratio)
    if not rows:
        reasons = "; ".join(f"{s['variant']}: {s['reason']}" for s in skipped)
        raise MissingBackendError(f"none of the requested backends could run here ({reasons})")
    env["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"format_version": 1, "setup": setup.to_json(), "models": models, "macs_ratio": macs_ratio,
            "params_ratio": params_ratio, "environment": env, "results": rows, "skipped": skipped}


def _measure_all(setup: Setup, subjects: dict[str, Subject], variants: list[tuple[Variant, Any]],
                 skipped: list[Skipped], macs_ratio: float, params_ratio: float) -> list[BenchRow]:
    """Each variant at each batch, teacher and student interleaved; a variant that fails to prepare
    is skipped with the reason (appended to ``skipped``)."""
    rows: list[BenchRow] = []
    for variant, prepare in variants:
        for batch in setup.batches:
            try:
                prepared = {role: prepare(subjects[role], batch) for role in ROLES}
            except (Unavailable, MissingBackendError, ExportError, ParityError) as e:
                skipped.append({"variant": variant.name, "reason": str(e)})
                break
            times = measure({r: fn for r, (fn, _) in prepared.items()}, setup.repeats, setup.warmup, variant.timer)
            rows.append(result_row(variant, batch, times, prepared["teacher"][1], macs_ratio, params_ratio))
            r = rows[-1]
            logger.info("%s batch %d: teacher %.2f ms, student %.2f ms, speedup %.2fx (MACs %.2fx)", variant.name,
                        batch, r["teacher"]["median_ms"], r["student"]["median_ms"], r["speedup"], 1 / macs_ratio)
            del prepared
            if setup.device == "cuda":
                torch.cuda.empty_cache()
    return rows
