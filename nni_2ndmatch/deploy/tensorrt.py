"""ONNX -> TensorRT engine (TensorRT 10 or newer), and running one.

TensorRT is imported lazily, inside the functions that need it. Engines are tied to the TensorRT
version and the GPU that built them: each ``.plan`` has a ``.plan.json`` beside it recording both,
and :func:`load_engine` refuses, with a clear error, an engine from another version or GPU.
TensorRT 11 has no ``BuilderFlag.FP16`` (networks are strongly typed): an fp16 engine there needs
an fp16 ONNX, whose tensor types the builder then follows.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes, atomic_write_json
from .artefact import check_out, sidecar_path
from .errors import DeployError, EngineMismatchError, ExportError, MissingBackendError

logger = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32")
INSTALL_HINT = ("install TensorRT 10 or newer for your CUDA version (pip install tensorrt, or the "
                "nni-2ndmatch[trt] extra; NVIDIA's wheels download from pypi.nvidia.com), on a machine "
                "with an NVIDIA GPU and driver")


def require_tensorrt():
    """The ``tensorrt`` module, or :class:`MissingBackendError` saying what is missing: TensorRT
    itself, a TensorRT older than 10, or a CUDA GPU."""
    try:
        import tensorrt as trt
    except ImportError as e:  # also a broken install whose libraries fail to load
        raise MissingBackendError(f"TensorRT is not available (import tensorrt failed: {e}); {INSTALL_HINT}") from None
    major = _major(getattr(trt, "__version__", "0"))
    if major < 10:
        raise MissingBackendError(f"TensorRT {getattr(trt, '__version__', '?')} is too old: this needs the "
                                  f"TensorRT 10+ API; {INSTALL_HINT}")
    import torch

    if not torch.cuda.is_available():
        raise MissingBackendError("no CUDA GPU is visible (torch.cuda.is_available() is False): TensorRT needs an "
                                  "NVIDIA GPU, its driver and a CUDA build of PyTorch (pip install torch from the "
                                  "CUDA index)")
    return trt


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def parse_batches(text: str) -> tuple[int, int, int]:
    """``"1,16,64"`` -> (min, opt, max) of the optimisation profile; one value: all three; two:
    (min, max, max)."""
    try:
        values = sorted(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or values[0] < 1:
        raise DeployError(f"batch={text!r} is not allowed; give 1 to 3 positive integers, e.g. 1,16,64 "
                          "(min,opt,max of the engine's batch range)")
    if len(values) == 1:
        return values[0], values[0], values[0]
    if len(values) == 2:
        return values[0], values[1], values[1]
    return values[0], values[1], values[2]


def _gpu() -> dict[str, Any]:
    import torch

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def _strongly_typed(trt, precision: str) -> bool:
    """fp16 needs a strongly typed network (an fp16 ONNX) where TensorRT has no FP16 builder flag."""
    return precision == "fp16" and not hasattr(trt.BuilderFlag, "FP16")


def check_onnx_file(onnx_path: str | os.PathLike) -> None:
    """:class:`DeployError` unless ``onnx_path`` is a well-formed ONNX model (onnx.checker, by
    path, so external data is found beside it)."""
    import onnx

    try:
        onnx.checker.check_model(str(onnx_path))
    except (onnx.checker.ValidationError, OSError, ValueError) as e:
        raise DeployError(f"{str(onnx_path)!r} is not a valid ONNX model (truncated or corrupted?): "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def onnx_is_fp16(onnx_path: str | os.PathLike) -> bool:
    """Whether the graph computes in float16 (some initializer is float16)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def needs_fp16_onnx(precision: str) -> bool:
    """Whether this TensorRT builds ``precision`` engines only from an fp16 ONNX (TensorRT 11+)."""
    return _strongly_typed(require_tensorrt(), precision)


def build_engine(onnx_path: str | os.PathLike, out: str | os.PathLike, *, precision: str = "fp16",
                 batches: tuple[int, int, int] = (1, 16, 64), timing_cache: str | os.PathLike | None = None,
                 workspace_gib: float | None = None) -> dict[str, Any]:
    """Build a TensorRT engine from ``onnx_path``; writes ``out`` and ``out.json`` (atomically) and
    returns the metadata. ``batches``: (min, opt, max) of the batch axis. ``timing_cache``: read if
    present, then written back with this build's timings."""
    if precision not in PRECISIONS:
        raise DeployError(f"precision={precision!r} is unknown; allowed: {', '.join(PRECISIONS)}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise DeployError(f"ONNX file {str(onnx_path)!r} does not exist")
    check_out(out)
    trt = require_tensorrt()
    strongly_typed = _strongly_typed(trt, precision)
    fp16_onnx = onnx_is_fp16(onnx_path)
    if strongly_typed and not fp16_onnx:
        raise DeployError(f"TensorRT {trt.__version__} builds fp16 engines only from an fp16 ONNX (strongly typed "
                          f"networks), and {onnx_path.name} is fp32: export it with --fp16")
    if precision == "fp32" and fp16_onnx:
        raise DeployError(f"{onnx_path.name} is an fp16 ONNX; an fp32 engine needs an fp32 one (export without --fp16)")

    logger_trt = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger_trt)
    if builder is None:
        raise MissingBackendError("TensorRT could not create a builder (no usable CUDA GPU?)")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger_trt)
    if not parser.parse_from_file(str(onnx_path)):  # a path: external data is found beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32, not TF32 matmuls

    profile = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        first, *rest = list(tensor.shape)
        if any(d < 0 for d in rest):
            raise DeployError(f"input {tensor.name} has a dynamic axis besides the batch: {list(tensor.shape)}")
        if first >= 0 and set(batches) != {first}:  # TensorRT's own message names neither cause nor cure
            raise DeployError(f"input {tensor.name} of {onnx_path.name} has a fixed batch of {first} (as "
                              f"to_onnx.py --no-batch-dynamic writes), so batch={','.join(map(str, batches))} cannot "
                              f"be built: give --batch {first}, or export the ONNX with a dynamic batch")
        lo, opt, hi = ([b, *rest] for b in batches)
        profile.set_shape(tensor.name, lo, opt, hi)
        shapes[tensor.name] = {"dtype": str(tensor.dtype).split(".")[-1].lower(), "min": lo, "opt": opt, "max": hi}
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False):
        logger.warning("timing cache %s comes from another GPU or TensorRT version: starting a new one", cache_path)
        cache_bytes = b""
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path.name} "
                           "(see the TensorRT messages above)")
    if cache_path:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    plan = bytes(memoryview(serialized))
    metadata = {
        "format_version": 1, "tensorrt_version": trt.__version__, **_gpu(), "precision": precision,
        "strongly_typed": strongly_typed, "inputs": shapes,
        "outputs": [network.get_output(i).name for i in range(network.num_outputs)],
        "onnx": onnx_path.name, "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "timing_cache": cache_path.name if cache_path else None, "timing_cache_reused": bool(cache_bytes),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_bytes(out, plan)
    atomic_write_json(sidecar_path(out), metadata)
    return metadata


def check_compatible(metadata: dict[str, Any], tensorrt_version: str, gpu: str, compute_capability: str) -> None:
    """:class:`EngineMismatchError` unless the engine's TensorRT version and GPU are these."""
    built = (metadata.get("tensorrt_version"), metadata.get("gpu"), metadata.get("compute_capability"))
    here = (tensorrt_version, gpu, compute_capability)
    if built != here:
        raise EngineMismatchError(
            f"the engine was built with TensorRT {built[0]} on {built[1]} (compute capability {built[2]}); this "
            f"machine has TensorRT {here[0]} on {here[1]} (compute capability {here[2]}). TensorRT engines "
            "only run where they were built: rebuild it here with export/to_trt.py")


def load_engine(plan: str | os.PathLike) -> TrtRunner:
    """Deserialize an engine, after checking its metadata against this machine, into a runner."""
    plan = Path(plan)
    if not plan.is_file():
        raise DeployError(f"engine file {str(plan)!r} does not exist")
    trt = require_tensorrt()
    meta_file = sidecar_path(plan)
    if meta_file.is_file():
        import json

        check_compatible(json.loads(meta_file.read_text()), trt.__version__, **_gpu())
    else:
        logger.warning("%s is missing: cannot check the engine's TensorRT version and GPU", meta_file.name)
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise EngineMismatchError(f"TensorRT {trt.__version__} cannot load {plan.name} (built by another TensorRT "
                                  "version or for another GPU?): rebuild it here with export/to_trt.py")
    return TrtRunner(runtime, engine)


class TrtRunner:
    """Runs an engine on CUDA tensors: ``runner(inputs) -> output`` (on the current torch stream).
    Inputs follow the engine's input order; the output buffer is reused for equal shapes."""

    def __init__(self, runtime, engine):
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.runtime, self.engine = runtime, engine  # the runtime must outlive its engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) != mode]
        self._out = None

    def _dtype(self, name: str):
        dtypes = {self.trt.DataType.FLOAT: self.torch.float32, self.trt.DataType.HALF: self.torch.float16,
                  self.trt.DataType.INT64: self.torch.int64, self.trt.DataType.INT32: self.torch.int32}
        return dtypes[self.engine.get_tensor_dtype(name)]

    def __call__(self, inputs: list) -> Any:
        torch = self.torch
        if len(inputs) != len(self.inputs):
            raise ValueError(f"the engine takes {len(self.inputs)} inputs ({self.inputs}); got {len(inputs)}")
        for name, tensor in zip(self.inputs, inputs):
            want = self._dtype(name)
            if tensor.dtype != want or not tensor.is_cuda or not tensor.is_contiguous():
                raise ValueError(f"input {name}: expected a contiguous CUDA {want} tensor, got {tensor.dtype} "
                                 f"on {tensor.device}")
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        name = self.outputs[0]
        shape = tuple(self.context.get_tensor_shape(name))
        if self._out is None or tuple(self._out.shape) != shape:
            self._out = torch.empty(shape, dtype=self._dtype(name), device="cuda")
        self.context.set_tensor_address(name, self._out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return self._out
