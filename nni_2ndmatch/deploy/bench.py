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

The results (JSON) have the shape of :class:`BenchResults`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor, nn

from ..files import atomic_write_bytes, write_results
from ..scoped import torch_threads
from ..utils import add_unique, is_integer
from .aoti import export_aoti
from .errors import DeployError, ExportError, MissingBackendError, ParityError
from .model_io import (
    DEFAULT_SEQ_LEN,
    OUTPUT_NAME,
    InputSpec,
    input_specs,
    macs_params,
    random_inputs,
    wrap,
)
from .onnx_export import export_onnx, ort_session, package_version
from .tensorrt import build_engine, load_engine, needs_fp16_onnx, require_tensorrt

logger = logging.getLogger(__name__)


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


class Unavailable(Exception):
    """This variant cannot run here (the reason is recorded, the benchmark goes on)."""


@dataclass
class Subject:
    """One model under test, with its lazily built artefacts (ONNX files, engines)."""

    role: str
    model: nn.Module
    specs: list[InputSpec]
    seed: int = 0
    exporter: str = "dynamo"
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The model's output shape without the batch axis."""
        with torch.inference_mode():
            return tuple(wrap(self.model, self.specs)(*random_inputs(self.specs, 1)).shape[1:])


@dataclass
class Variant:
    name: str
    backend: str
    device: str
    precision: str
    timer: str  # "wall" or "cuda-events"
    prepare: Callable[[Subject, int], tuple[Callable[[], Any], list[str] | None]]


# --- variants ------------------------------------------------------------------------------------

def _inference(fn: Callable[..., Tensor], inputs: list[Tensor]) -> Callable[[], Tensor]:
    """The timed call: ``fn(*inputs)`` without autograd."""
    def run() -> Tensor:
        with torch.inference_mode():
            return fn(*inputs)
    return run


def _torch_eager(device: str) -> Callable:
    def prepare(subject: Subject, batch: int):
        model = subject.model if device == "cpu" else copy.deepcopy(subject.model).to(device)
        return _inference(wrap(model, subject.specs), random_inputs(subject.specs, batch, subject.seed, device)), None
    return prepare


def _torch_cuda_graph(subject: Subject, batch: int):
    """fp16 weights, inputs and compute; the forward captured once in a CUDA graph, then replayed."""
    model = copy.deepcopy(subject.model).half().cuda().eval()
    wrapper = wrap(model, subject.specs, half=True)
    inputs = [t.half() if t.is_floating_point() and s.name != "timestep" else t
              for s, t in zip(subject.specs, random_inputs(subject.specs, batch, subject.seed, "cuda"))]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm up outside the graph (allocations, cuDNN choices)
            wrapper(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = wrapper(*inputs)

    # The graph reads the weights and inputs at fixed addresses but holds no reference to them; freed,
    # their memory is reused and a replay reads garbage or faults (seen on an H200). Keep them alive.
    def replay() -> Tensor:
        graph.replay()
        return out
    replay.keep_alive = (model, inputs)
    return replay, None


def _torch_compile(device: str, precision: str) -> Callable:
    """torch.compile in this process, one graph per batch size; on a GPU fp16 with CUDA graphs
    (mode reduce-overhead), the compiled counterpart of torch-cuda-fp16-cudagraph."""
    def prepare(subject: Subject, batch: int):
        model = copy.deepcopy(subject.model).to(device)
        half = precision == "fp16"
        wrapper = wrap(model.half() if half else model, subject.specs, half=half)
        compiled = torch.compile(wrapper, mode="reduce-overhead" if device == "cuda" else None, dynamic=False)
        return _inference(compiled, random_inputs(subject.specs, batch, subject.seed, device)), None
    return prepare


def _aoti(device: str, precision: str, workdir: Path, seq_len: int, batches: list[int]) -> Callable:
    """An AOTInductor package per model (export_aoti: batch 1 to the largest benchmarked)."""
    def prepare(subject: Subject, batch: int):
        key = f"aoti-{precision}"
        if key not in subject.files:
            path = workdir / f"{subject.role}-{device}-{precision}.pt2"
            export_aoti(subject.model, path, device=device, batches=batches, fp16=precision == "fp16",
                        seq_len=seq_len, source={"role": subject.role})
            subject.files[key] = path
        package = torch._inductor.aoti_load_package(str(subject.files[key]))
        return _inference(package, random_inputs(subject.specs, batch, subject.seed, device)), None
    return prepare


def _onnx_file(subject: Subject, workdir: Path, seq_len: int, fp16: bool = False) -> Path:

    key = "onnx-fp16" if fp16 else "onnx"
    if key not in subject.files:
        path = workdir / f"{subject.role}{'-fp16' if fp16 else ''}.onnx"
        export_onnx(subject.model, path, fp16=fp16, seq_len=seq_len, exporter=subject.exporter,
                    source={"role": subject.role})
        subject.files[key] = path
    return subject.files[key]


def _onnxruntime(provider: str, workdir: Path, seq_len: int, threads: int, fp16: bool = False,
                 cuda_graph: bool = False) -> Callable:
    """An onnxruntime session of the model's ONNX file (``fp16``: the float16 export, float32 I/O)
    on ``provider``; on a GPU, inputs and output bound to CUDA memory (I/O binding) and, with
    ``cuda_graph``, the run captured in a CUDA graph and replayed (onnxruntime's enable_cuda_graph)."""
    def prepare(subject: Subject, batch: int):
        options = {"enable_cuda_graph": "1"} if cuda_graph else {}
        providers = [provider] if provider == "CPUExecutionProvider" else \
            [(provider, options) if options else provider, "CPUExecutionProvider"]
        session = ort_session(_onnx_file(subject, workdir, seq_len, fp16=fp16), threads=threads, providers=providers)
        obtained = session.get_providers()
        if obtained[0] != provider:
            raise Unavailable(f"onnxruntime did not obtain {provider} (session providers: {obtained})")
        inputs = random_inputs(subject.specs, batch, subject.seed)
        if provider == "CPUExecutionProvider":
            feeds = {s.name: t.numpy() for s, t in zip(subject.specs, inputs)}
            return (lambda: session.run([OUTPUT_NAME], feeds)), obtained
        on_device = [t.cuda() for t in inputs]  # inputs and output stay on the GPU (I/O binding)
        out = torch.empty(batch, *subject.output_shape, device="cuda")  # fixed addresses: a CUDA graph needs them
        binding = session.io_binding()
        for s, t in zip(subject.specs, on_device):
            binding.bind_input(s.name, "cuda", 0, np.dtype(s.dtype), tuple(t.shape), t.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", 0, np.float32, tuple(out.shape), out.data_ptr())
        try:
            session.run_with_iobinding(binding)  # with a CUDA graph: the capture
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error types
            where = f"{provider}{' in a CUDA graph' if cuda_graph else ''}"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise Unavailable(f"onnxruntime could not run the graph on {where}: {first}") from None

        def run() -> Tensor:
            session.run_with_iobinding(binding)
            return out
        run.keep_alive = (on_device, out)
        return run, obtained
    return prepare


def _tensorrt(precision: str, workdir: Path, seq_len: int, batches: list[int]) -> Callable:
    def prepare(subject: Subject, batch: int):
        key = f"plan-{precision}"
        if key not in subject.files:
            onnx_path = _onnx_file(subject, workdir, seq_len, fp16=needs_fp16_onnx(precision))
            plan = workdir / f"{subject.role}-{precision}.plan"
            build_engine(onnx_path, plan, precision=precision, batches=(min(batches), max(batches), max(batches)),
                         timing_cache=workdir / "timing.cache")
            subject.files[key] = plan
        runner = load_engine(subject.files[key])
        inputs = random_inputs(subject.specs, batch, subject.seed, "cuda")
        return (lambda: runner(inputs)), None
    return prepare


@dataclass(frozen=True)
class Setup:
    """What a variant's preparation needs from the benchmark's options."""

    workdir: Path
    threads: int
    seq_len: int
    batches: list[int]


@dataclass(frozen=True)
class VariantSpec:
    """One registered way to run a model: ``make(setup)`` gives its ``prepare``; ``missing()``
    says why it cannot run here (None: it can)."""

    name: str
    backend: str
    device: str
    precision: str
    timer: str  # "wall" or "cuda-events"
    make: Callable[[Setup], Callable[[Subject, int], tuple[Callable[[], Any], list[str] | None]]]
    missing: Callable[[], str | None] = lambda: None


VARIANTS: dict[str, VariantSpec] = {}


def register_variant(spec: VariantSpec) -> VariantSpec:
    """Add a benchmark variant (a duplicate name is an error); ``backends`` then takes its backend."""
    return add_unique(VARIANTS, spec.name, spec, "benchmark variant")


def backends_on(device: str) -> list[str]:
    """The backends with a variant on ``device`` ("cpu" or "cuda"), in registration order."""
    return list(dict.fromkeys(v.backend for v in VARIANTS.values() if v.device == device))


def _ort_missing(provider: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        return None if provider in available else (f"onnxruntime has no {provider} (available: {available}); "
                                                   "install onnxruntime-gpu in place of onnxruntime")
    return missing


def _trt_missing() -> str | None:
    try:
        require_tensorrt()
    except MissingBackendError as e:
        return str(e)
    return None


for _spec in (
    VariantSpec("torch-cpu-fp32", "torch", "cpu", "fp32", "wall", lambda s: _torch_eager("cpu")),
    VariantSpec("torch-cuda-fp32", "torch", "cuda", "fp32", "cuda-events", lambda s: _torch_eager("cuda")),
    VariantSpec("torch-cuda-fp16-cudagraph", "torch", "cuda", "fp16", "cuda-events", lambda s: _torch_cuda_graph),
    VariantSpec("torch-compile-cpu-fp32", "torch-compile", "cpu", "fp32", "wall",
                lambda s: _torch_compile("cpu", "fp32")),
    VariantSpec("torch-compile-cuda-fp16", "torch-compile", "cuda", "fp16", "cuda-events",
                lambda s: _torch_compile("cuda", "fp16")),
    VariantSpec("aoti-cpu-fp32", "aoti", "cpu", "fp32", "wall",
                lambda s: _aoti("cpu", "fp32", s.workdir, s.seq_len, s.batches)),
    VariantSpec("aoti-cuda-fp16", "aoti", "cuda", "fp16", "cuda-events",
                lambda s: _aoti("cuda", "fp16", s.workdir, s.seq_len, s.batches)),
    VariantSpec("onnxruntime-cpu", "onnxruntime", "cpu", "fp32", "wall",
                lambda s: _onnxruntime("CPUExecutionProvider", s.workdir, s.seq_len, s.threads)),
    VariantSpec("onnxruntime-cuda", "onnxruntime", "cuda", "fp32", "wall",
                lambda s: _onnxruntime("CUDAExecutionProvider", s.workdir, s.seq_len, s.threads),
                _ort_missing("CUDAExecutionProvider")),
    VariantSpec("onnxruntime-cuda-fp16", "onnxruntime", "cuda", "fp16", "wall",
                lambda s: _onnxruntime("CUDAExecutionProvider", s.workdir, s.seq_len, s.threads, fp16=True,
                                       cuda_graph=True),
                _ort_missing("CUDAExecutionProvider")),
    VariantSpec("onnxruntime-tensorrt", "onnxruntime", "cuda", "fp32", "wall",
                lambda s: _onnxruntime("TensorrtExecutionProvider", s.workdir, s.seq_len, s.threads),
                _ort_missing("TensorrtExecutionProvider")),
    VariantSpec("tensorrt-fp16", "tensorrt", "cuda", "fp16", "cuda-events",
                lambda s: _tensorrt("fp16", s.workdir, s.seq_len, s.batches), _trt_missing),
    VariantSpec("tensorrt-fp32", "tensorrt", "cuda", "fp32", "cuda-events",
                lambda s: _tensorrt("fp32", s.workdir, s.seq_len, s.batches), _trt_missing),
):
    register_variant(_spec)


def _variants(backends: list[str], device: str, workdir: Path, *, threads: int, seq_len: int,
              trt_precision: str, batches: list[int]) -> tuple[list[Variant], list[Skipped]]:
    """The registered variants of ``backends`` on ``device`` (TensorRT: ``trt_precision`` only),
    and those that cannot run here, with the reason."""
    setup = Setup(workdir, threads, seq_len, batches)
    variants, skipped = [], []
    for spec in VARIANTS.values():
        if spec.backend not in backends or (spec.device != device and spec.backend != "tensorrt") or \
                (spec.backend == "tensorrt" and spec.precision != trt_precision):
            continue
        reason = spec.missing()
        if reason is not None:
            skipped.append({"variant": spec.name, "reason": reason})
        else:
            variants.append(Variant(spec.name, spec.backend, spec.device, spec.precision, spec.timer,
                                    spec.make(setup)))
    return variants, skipped


# --- timing --------------------------------------------------------------------------------------

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


def summarize(seconds: list[float], batch: int) -> LatencyStats:
    ms = np.asarray(seconds) * 1e3
    median = float(np.median(ms))
    return {"median_ms": median, "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "samples_per_s": batch / (median / 1e3), "runs": len(ms)}


# --- environment ---------------------------------------------------------------------------------

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


# --- the benchmark -------------------------------------------------------------------------------

def _check(backends: list[str], batches: list[int], device: str, threads: int, repeats: int, warmup: int) -> None:
    known = list(dict.fromkeys(v.backend for v in VARIANTS.values()))
    unknown = [b for b in backends if b not in known]
    if unknown or not backends:
        raise DeployError(f"backends={','.join(backends)!r} is not allowed; choose from: {', '.join(known)}")
    if not batches or any(not is_integer(b) or b < 1 for b in batches):
        raise DeployError(f"batches={batches!r} is not allowed; give positive integers, e.g. 1,16")
    if device not in DEVICES:
        raise DeployError(f"device={device!r} is unknown; allowed: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise MissingBackendError("device=cuda, but no CUDA GPU is visible (torch.cuda.is_available() is False)")
    for name, value, low in (("threads", threads, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not is_integer(value) or value < low:
            raise DeployError(f"{name}={value!r} is not allowed; it must be an integer >= {low}")


def _result_row(variant: Variant, batch: int, times: dict[str, list[float]], providers: list[str] | None,
         macs_ratio: float, params_ratio: float) -> BenchRow:
    teacher, student = summarize(times["teacher"], batch), summarize(times["student"], batch)
    ratio = student["median_ms"] / teacher["median_ms"]
    return {"variant": variant.name, "backend": variant.backend, "device": variant.device,
            "precision": variant.precision, "timer": variant.timer, "batch": batch, "providers": providers,
            "teacher": teacher, "student": student, "latency_ratio": ratio, "speedup": 1 / ratio,
            "macs_ratio": macs_ratio, "params_ratio": params_ratio, "speedup_vs_macs": macs_ratio / ratio}


def run_benchmark(teacher: nn.Module, student: nn.Module, *, backends: list[str] = ("torch", "onnxruntime"),
                  batches: list[int] = (1, 16), device: str = "auto", threads: int = 1, repeats: int = 20,
                  warmup: int = 3, trt_precision: str = "fp16", seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0,
                  exporter: str = "dynamo",
                  teacher_info: dict[str, Any] | None = None, student_info: dict[str, Any] | None = None,
                  workdir: str | os.PathLike | None = None,
                  onnx_files: dict[str, Path] | None = None) -> BenchResults:
    """Measure ``teacher`` and ``student`` on every variant of ``backends``; returns the results
    (:class:`BenchResults`). ``threads``: CPU threads of torch and onnxruntime; ``exporter``:
    the ONNX exporter for the onnxruntime and TensorRT variants; ``onnx_files``: fp32 ONNX files
    already exported from the two models ({"teacher": path, "student": path}), used instead of new exports."""
    backends, batches = list(backends), sorted(set(batches))
    _check(backends, batches, device, threads, repeats, warmup)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    subjects = {role: Subject(role, m.eval(), input_specs(m, seq_len), seed, exporter,
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
    env = environment(device, threads)
    rows: list[BenchRow] = []
    with torch_threads(threads):
        with tempfile.TemporaryDirectory(prefix="nni2ndmatch-bench-", dir=workdir) as tmp:
            variants, skipped = _variants(backends, device, Path(tmp), threads=threads, seq_len=seq_len,
                                          trt_precision=trt_precision, batches=batches)
            for variant in variants:
                for batch in batches:
                    try:
                        prepared = {role: variant.prepare(subjects[role], batch) for role in ROLES}
                    except (Unavailable, MissingBackendError, ExportError, ParityError) as e:
                        skipped.append({"variant": variant.name, "reason": str(e)})
                        break
                    times = measure({r: fn for r, (fn, _) in prepared.items()}, repeats, warmup, variant.timer)
                    rows.append(_result_row(variant, batch, times, prepared["teacher"][1], macs_ratio, params_ratio))
                    r = rows[-1]
                    logger.info("%s batch %d: teacher %.2f ms, student %.2f ms, speedup %.2fx (MACs %.2fx)",
                                variant.name, batch, r["teacher"]["median_ms"], r["student"]["median_ms"],
                                r["speedup"], 1 / macs_ratio)
                    del prepared
                    if device == "cuda":
                        torch.cuda.empty_cache()
    if not rows:
        reasons = "; ".join(f"{s['variant']}: {s['reason']}" for s in skipped)
        raise MissingBackendError(f"none of the requested backends could run here ({reasons})")
    env["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"format_version": 1,
            "setup": {"backends": backends, "batches": batches, "device": device, "threads": threads,
                      "repeats": repeats, "warmup": warmup, "seq_len": seq_len, "trt_precision": trt_precision,
                      "seed": seed, "exporter": exporter},
            "models": models, "macs_ratio": macs_ratio, "params_ratio": params_ratio, "environment": env,
            "results": rows, "skipped": skipped}


# --- reports -------------------------------------------------------------------------------------

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


def plot(results: BenchResults, path: str | os.PathLike) -> bool:
    """A bar chart of median latencies (PNG); False, with a logged note, without matplotlib."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no bar chart (pip install matplotlib)")
        return False
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
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def write_reports(results: BenchResults, out: str | os.PathLike) -> list[Path]:
    """``out`` (JSON), and beside it the same name with .md and .png; returns the paths written."""
    out = Path(out)
    write_results(out, results, render_markdown(results))
    written = [out, out.with_suffix(".md")]
    if plot(results, out.with_suffix(".png")):
        written.append(out.with_suffix(".png"))
    return written
