"""Timing: interleaved calls of the models under test (wall clock or CUDA events), and the machine
they ran on."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..onnx_export import package_version


def _timer(kind: str) -> Callable[[Callable[[], Any]], float]:
    if kind == "wall":
        def wall(fn: Callable[[], Any]) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return wall

    def cuda_events(fn: Callable[[], Any]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return cuda_events


def measure(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, timer: str) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` calls each first (not counted), then
    ``repeats`` rounds calling all of them, in an order reversed every other round."""
    time_one = _timer(timer)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if timer != "wall":
        torch.cuda.synchronize()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(time_one(fns[name]))
    return times


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: str, threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(), "device": device, "gpu": gpu,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if device == "cuda" else None,
        "threads": threads, "torch": torch.__version__, "onnx": package_version("onnx"), "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "tensorrt": package_version("tensorrt") or package_version("tensorrt-cu12") or package_version("tensorrt-cu13"),
        "load_average_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
