"""What a benchmark returns and ``latency.json`` holds (:class:`BenchResults`), and how its rows are
computed from the measured seconds."""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np


class LatencyStats(TypedDict):
    """One model's latencies in one variant and batch: milliseconds per call, and ``samples_per_s``
    (batch / median)."""
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    samples_per_s: float
    runs: int


class BenchRow(TypedDict):
    """One variant at one batch size. ``latency_ratio``: student / teacher median latency;
    ``speedup``: its inverse; ``speedup_vs_macs``: speedup x macs_ratio, the share of the
    MACs-predicted speedup realised."""
    variant: str
    backend: str
    device: str
    precision: str
    timer: str
    batch: int
    providers: list[str] | None
    teacher: LatencyStats
    student: LatencyStats
    latency_ratio: float
    speedup: float
    macs_ratio: float
    params_ratio: float
    speedup_vs_macs: float


class Skipped(TypedDict):
    variant: str
    reason: str


class BenchSetup(TypedDict):
    backends: list[str]
    batches: list[int]
    device: str
    threads: int
    repeats: int
    warmup: int
    seq_len: int
    trt_precision: str
    seed: int
    exporter: str


class BenchResults(TypedDict):
    """What :func:`run_benchmark` returns and ``latency.json`` holds. ``models``: teacher / student,
    each its source, kind and class as given, with ``macs`` and ``params``; ``macs_ratio`` and
    ``params_ratio``: student / teacher; ``environment``: see :func:`environment` (versions,
    CPU or GPU, threads, load averages before and after)."""
    format_version: int
    setup: BenchSetup
    models: dict[str, dict[str, Any]]
    macs_ratio: float
    params_ratio: float
    environment: dict[str, Any]
    results: list[BenchRow]
    skipped: list[Skipped]


DEVICES = ("auto", "cpu", "cuda")
ROLES = ("teacher", "student")


def summarize(seconds: list[float], batch: int) -> LatencyStats:
    ms = np.asarray(seconds) * 1e3
    median = float(np.median(ms))
    return {"median_ms": median, "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "samples_per_s": batch / (median / 1e3), "runs": len(ms)}


def result_row(variant: Any, batch: int, times: dict[str, list[float]], providers: list[str] | None,
               macs_ratio: float, params_ratio: float) -> BenchRow:
    """One row of the results: ``variant`` (a :class:`~.variants.Variant`) at ``batch``, from the seconds
    per call of each role."""
    teacher, student = summarize(times["teacher"], batch), summarize(times["student"], batch)
    ratio = student["median_ms"] / teacher["median_ms"]
    return {"variant": variant.name, "backend": variant.backend, "device": variant.device,
            "precision": variant.precision, "timer": variant.timer, "batch": batch, "providers": providers,
            "teacher": teacher, "student": student, "latency_ratio": ratio, "speedup": 1 / ratio,
            "macs_ratio": macs_ratio, "params_ratio": params_ratio, "speedup_vs_macs": macs_ratio / ratio}
