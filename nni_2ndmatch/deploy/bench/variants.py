"""The ways a model is run and timed (variants), one registry of them, and the setup a benchmark
runs with: what backends, batches, device and threads; how many repeats; where its files go."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...utils import add_unique, is_integer
from ..aoti import export_aoti
from ..errors import DeployError, MissingBackendError
from ..model_io import OUTPUT_NAME, InputSpec, random_inputs, wrap
from ..onnx_export import EXPORTERS, export_onnx, ort_session
from ..tensorrt import build_engine, load_engine, needs_fp16_onnx, require_tensorrt
from .results import DEVICES, ROLES, BenchSetup, Skipped


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

@dataclass(frozen=True)
class Setup:
    """How a benchmark runs, checked when made (a bad value is a :class:`DeployError` naming it).
    ``backends``: registered backends (see :data:`VARIANTS`); ``batches``: batch sizes (sorted,
    each once); ``device``: auto, cpu or cuda; ``threads``: CPU threads of torch and onnxruntime;
    ``repeats`` interleaved timed calls per model after ``warmup`` uncounted ones; ``seq_len``: the
    text length of a conditioned model's inputs; ``trt_precision``: the TensorRT engines'; ``seed``
    of the random inputs; ``exporter``: the ONNX exporter of the onnxruntime and TensorRT variants;
    ``workdir``: where the exported files go (``run_benchmark`` makes a temporary folder in it, or
    in the system's when None, and hands the variants the setup with that folder)."""

    backends: tuple[str, ...] = ("torch", "onnxruntime")
    batches: tuple[int, ...] = (1, 16)
    device: str = "auto"
    threads: int = 1
    repeats: int = 20
    warmup: int = 3
    seq_len: int | None = None
    trt_precision: str = "fp16"
    seed: int = 0
    exporter: str = "dynamo"
    workdir: Path | None = None

    def __post_init__(self) -> None:
        backends, batches = tuple(self.backends), self.batches
        known = list(dict.fromkeys(v.backend for v in VARIANTS.values()))
        unknown = [b for b in backends if b not in known]
        if unknown or not backends:
            raise DeployError(f"backends={','.join(backends)!r} is not allowed; choose from: {', '.join(known)}")
        if not batches or any(not is_integer(b) or b < 1 for b in batches):
            raise DeployError(f"batches={batches!r} is not allowed; give positive integers, e.g. 1,16")
        if self.device not in DEVICES:
            raise DeployError(f"device={self.device!r} is unknown; allowed: {', '.join(DEVICES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise MissingBackendError("device=cuda, but no CUDA GPU is visible (torch.cuda.is_available() is False)")
        for name in ("threads", "repeats", "warmup"):  # warmup >= 1: compiled variants compile on their first call
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise DeployError(f"{name}={value!r} is not allowed; it must be an integer >= 1")
        precisions = sorted({v.precision for v in VARIANTS.values() if v.backend == "tensorrt"})
        if self.trt_precision not in precisions:
            raise DeployError(f"trt_precision={self.trt_precision!r} is not allowed; allowed: {', '.join(precisions)}")
        if self.exporter not in EXPORTERS:
            raise DeployError(f"exporter={self.exporter!r} is unknown; allowed: {', '.join(EXPORTERS)}")
        object.__setattr__(self, "backends", backends)
        object.__setattr__(self, "batches", tuple(sorted(set(batches))))

    def on(self, device: str, workdir: Path) -> Setup:
        """This setup on the device it resolved to, with the folder its variants write to."""
        return dataclasses.replace(self, device=device, workdir=workdir)

    def to_json(self) -> BenchSetup:
        return {"backends": list(self.backends), "batches": list(self.batches), "device": self.device,
                "threads": self.threads, "repeats": self.repeats, "warmup": self.warmup, "seq_len": self.seq_len,
                "trt_precision": self.trt_precision, "seed": self.seed, "exporter": self.exporter}


@dataclass(frozen=True)
class Variant:
    """One registered way to run a model: ``make(setup)`` gives its ``prepare(subject, batch)``,
    which builds the timed call (and the onnxruntime providers obtained, or None); ``missing()``
    says why it cannot run here (None: it can). ``timer``: "wall", or "cuda-events" for
    asynchronous GPU calls."""

    name: str
    backend: str
    device: str
    precision: str
    timer: str
    make: Callable[[Setup], Callable[[Subject, int], tuple[Callable[[], Any], list[str] | None]]]
    missing: Callable[[], str | None] = lambda: None


VariantSpec = Variant  # its earlier name


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
        if subject.role == ROLES[0]:  # a new batch: forget the last one's graphs, so that the two models' fresh
            torch._dynamo.reset()  # ones stay under dynamo's limit of graphs per function (else: eager, unsaid)
        model = copy.deepcopy(subject.model).to(device)
        half = precision == "fp16"
        wrapper = wrap(model.half() if half else model, subject.specs, half=half)
        compiled = torch.compile(wrapper, mode="reduce-overhead" if device == "cuda" else None, dynamic=False)
        run = _inference(compiled, random_inputs(subject.specs, batch, subject.seed, device))
        try:
            run()  # compiles now: a compiler that cannot run here skips the variant, with its reason
        except Exception as e:  # inductor raises its own types (InductorError, BackendCompilerFailed, ...)
            raise Unavailable(f"torch.compile failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
        return run, None
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


def _tensorrt(precision: str, workdir: Path, seq_len: int) -> Callable:
    """An engine per model and batch size, built for that batch alone (min = opt = max): TensorRT
    picks its kernels for the profile's opt shape, so one engine for every batch would time the
    smaller batches on kernels chosen for another."""
    def prepare(subject: Subject, batch: int):
        onnx_path = _onnx_file(subject, workdir, seq_len, fp16=needs_fp16_onnx(precision))
        plan = workdir / f"{subject.role}-{precision}-batch{batch}.plan"
        build_engine(onnx_path, plan, precision=precision, batches=(batch, batch, batch),
                     timing_cache=workdir / "timing.cache")
        runner = load_engine(plan)
        plan.unlink()  # read: a large model's engines per batch would fill the disk
        inputs = random_inputs(subject.specs, batch, subject.seed, "cuda")
        return (lambda: runner(inputs)), None
    return prepare


VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Add a benchmark variant (a duplicate name is an error); ``backends`` then takes its backend."""
    return add_unique(VARIANTS, variant.name, variant, "benchmark variant")


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


for _variant in (
    Variant("torch-cpu-fp32", "torch", "cpu", "fp32", "wall", lambda s: _torch_eager("cpu")),
    Variant("torch-cuda-fp32", "torch", "cuda", "fp32", "cuda-events", lambda s: _torch_eager("cuda")),
    Variant("torch-cuda-fp16-cudagraph", "torch", "cuda", "fp16", "cuda-events", lambda s: _torch_cuda_graph),
    Variant("torch-compile-cpu-fp32", "torch-compile", "cpu", "fp32", "wall",
                lambda s: _torch_compile("cpu", "fp32")),
    Variant("torch-compile-cuda-fp16", "torch-compile", "cuda", "fp16", "cuda-events",
                lambda s: _torch_compile("cuda", "fp16")),
    Variant("aoti-cpu-fp32", "aoti", "cpu", "fp32", "wall",
                lambda s: _aoti("cpu", "fp32", s.workdir, s.seq_len, s.batches)),
    Variant("aoti-cuda-fp16", "aoti", "cuda", "fp16", "cuda-events",
                lambda s: _aoti("cuda", "fp16", s.workdir, s.seq_len, s.batches)),
    Variant("onnxruntime-cpu", "onnxruntime", "cpu", "fp32", "wall",
                lambda s: _onnxruntime("CPUExecutionProvider", s.workdir, s.seq_len, s.threads)),
    Variant("onnxruntime-cuda", "onnxruntime", "cuda", "fp32", "wall",
                lambda s: _onnxruntime("CUDAExecutionProvider", s.workdir, s.seq_len, s.threads),
                _ort_missing("CUDAExecutionProvider")),
    Variant("onnxruntime-cuda-fp16", "onnxruntime", "cuda", "fp16", "wall",
                lambda s: _onnxruntime("CUDAExecutionProvider", s.workdir, s.seq_len, s.threads, fp16=True,
                                       cuda_graph=True),
                _ort_missing("CUDAExecutionProvider")),
    Variant("onnxruntime-tensorrt", "onnxruntime", "cuda", "fp32", "wall",
                lambda s: _onnxruntime("TensorrtExecutionProvider", s.workdir, s.seq_len, s.threads),
                _ort_missing("TensorrtExecutionProvider")),
    Variant("tensorrt-fp16", "tensorrt", "cuda", "fp16", "cuda-events",
                lambda s: _tensorrt("fp16", s.workdir, s.seq_len), _trt_missing),
    Variant("tensorrt-fp32", "tensorrt", "cuda", "fp32", "cuda-events",
                lambda s: _tensorrt("fp32", s.workdir, s.seq_len), _trt_missing),
):
    register_variant(_variant)


def select(setup: Setup) -> tuple[list[tuple[Variant, Callable]], list[Skipped]]:
    """The registered variants of ``setup.backends`` on ``setup.device`` (TensorRT: its precision
    only), each with its ``prepare``, and those that cannot run here, with the reason."""
    chosen, skipped = [], []
    for variant in VARIANTS.values():
        if variant.backend not in setup.backends or \
                (variant.device != setup.device and variant.backend != "tensorrt") or \
                (variant.backend == "tensorrt" and variant.precision != setup.trt_precision):
            continue
        reason = variant.missing()
        if reason is not None:
            skipped.append({"variant": variant.name, "reason": reason})
        else:
            chosen.append((variant, variant.make(setup)))
    return chosen, skipped
