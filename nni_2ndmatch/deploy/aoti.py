"""PyTorch -> AOTInductor package (``.pt2``), checked against PyTorch before anything is written.

AOTInductor compiles the model ahead of time into one self-contained file (the weights and a
shared library of generated C++ or CUDA kernels) that runs without the model's Python code:

    package = torch._inductor.aoti_load_package("student.pt2")
    out = package(sample, timestep)              # + encoder_hidden_states or class_labels

The package takes the contract of :mod:`.model_io` with one dynamic batch axis, any batch from 1 to
the largest of ``batches`` (the runtime does not check the upper bound: stay inside it), on the
device it was built for (the same GPU architecture and torch version). Before the file is written
it runs on fresh random inputs at each of ``batches``, loaded in a child process (a crash of the
AOTInductor runtime there is an :class:`ExportError`, exit 1, and nothing is written); the errors
against PyTorch fp32 on the CPU go into a sidecar ``<out>.json``, with the batch range, the inputs
and the versions. Above tolerance nothing is written and :class:`ParityError` is raised.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..compat import batch_independent
from ..errors import MissingBackendError
from ..files import load_tensors, save_tensors
from ..utils import is_integer
from .artefact import check_out, publish
from .errors import DeployError, ExportError
from .model_io import OUTPUT_NAME, InputSpec, input_specs, random_inputs, wrap
from .onnx_export import errors_against, quiet_exporter, versions

DEVICES = ("cpu", "cuda")
DEFAULT_BATCHES = (1, 16, 64)
#: Max |package - torch| / max |torch| allowed. CUDA fp32 convolutions use TF32 (cuDNN's default).
TOLERANCE = {("cpu", "fp32"): 1e-4, ("cuda", "fp32"): 1e-2, ("cuda", "fp16"): 1e-2}


def check_options(device: str, batches: tuple[int, ...], fp16: bool, tolerance: float | None) -> None:
    """A package's options, checked before any work (a DeployError naming the option; no GPU or no
    compiler: MissingBackendError)."""
    if device not in DEVICES:
        raise DeployError(f"device={device!r} is unknown; allowed: {', '.join(DEVICES)}")
    if not batches or any(not is_integer(b) or b < 1 for b in batches):
        raise DeployError(f"batches={list(batches)!r} is not allowed; give positive integers, e.g. 1,16,64")
    if fp16 and device != "cuda":
        raise DeployError("fp16=True is not allowed with device='cpu'; fp16 packages are built for cuda")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise DeployError(f"tolerance={tolerance!r} is not allowed; it must be a number > 0")
    if device == "cuda" and not torch.cuda.is_available():
        raise MissingBackendError("device=cuda, but no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if device == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise MissingBackendError("AOTInductor needs a C++ compiler for CPU packages and none is on the PATH "
                                  "(install g++ or clang++)")


def _export(model: nn.Module, specs: list[InputSpec], device: str, fp16: bool, max_batch: int):
    target = wrap(model, specs, half=fp16)
    example = tuple(random_inputs(specs, min(2, max_batch), device=device))  # batch 2: not 0/1-specialised
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch > 1 else None
    shapes = tuple({0: batch} for _ in specs) if batch is not None else None
    try:
        with quiet_exporter(), batch_independent(model), torch.no_grad():
            return torch.export.export(target, example, dynamic_shapes=shapes)
    except Exception as e:  # torch.export raises many types; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"torch.export failed on {type(model).__name__}: {type(e).__name__}: {first}") from e


def _compile(program, path: Path, metadata: dict[str, str]) -> None:
    try:
        with quiet_exporter():
            torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                     inductor_configs={"aot_inductor.metadata": metadata})
    except Exception as e:  # noqa: BLE001 - compiler errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"AOTInductor failed to compile the exported program: {type(e).__name__}: {first}") from e


#: How the package is loaded and run for its parity check: in a child interpreter, because the
#: AOTInductor runtime can crash the process that loads a package (SIGSEGV on an H200 with torch
#: 2.11 for every CUDA package); the child's death becomes an error, not a dead interpreter.
CHILD = [sys.executable, "-m", "nni_2ndmatch.deploy.aoti_check"]


def run_in_child(path: Path, inputs: dict[int, list[Tensor]], device: str) -> dict[int, Tensor]:
    """The package's output for each batch of ``inputs``, computed in a child process on ``device``;
    a crash or failure of the child is an :class:`ExportError` naming the signal (or its last
    error line), the torch version and the device."""
    where = f"torch {torch.__version__}, device {device}" + \
        (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
    with tempfile.TemporaryDirectory(prefix="aoti-check-") as tmp:
        save_tensors(Path(tmp) / "inputs.safetensors",
                     {f"{batch}.{i}": t for batch, ts in inputs.items() for i, t in enumerate(ts)})
        done = subprocess.run([*CHILD, str(path), str(Path(tmp) / "inputs.safetensors"),
                               str(Path(tmp) / "outputs.safetensors"), device], capture_output=True, text=True)
        if done.returncode < 0:
            name = signal.Signals(-done.returncode).name
            raise ExportError(f"the AOTInductor runtime crashed ({name}) loading or running the package ({where}); "
                              "nothing was written")
        if done.returncode != 0:
            last = next((line for line in reversed(done.stderr.strip().splitlines()) if line.strip()), "")
            raise ExportError(f"the AOTInductor runtime failed loading or running the package ({where}): {last}; "
                              "nothing was written")
        outputs = load_tensors(Path(tmp) / "outputs.safetensors")
    return {int(key): value for key, value in outputs.items()}


def _parity(path: Path, reference: nn.Module, specs: list[InputSpec], device: str, batches: tuple[int, ...],
            seed: int, tolerance: float) -> dict[str, Any]:
    inputs = {batch: random_inputs(specs, batch, seed=seed + 1 + batch) for batch in batches}  # not the export's
    outputs = run_in_child(path, inputs, device)
    results = {}
    for batch in batches:
        with torch.inference_mode():
            want = reference(*inputs[batch]).double().numpy()
        results[str(batch)] = errors_against(outputs[batch].float().numpy(), want)
    worst_abs = max(b["max_abs_error"] for b in results.values())
    worst_rel = max(b["max_rel_error"] for b in results.values())
    return {"reference": "PyTorch fp32, CPU",
            "runtime": f"torch._inductor.aoti_load_package, {device} (a child process)",
            "metric": "max_rel_error = max|package - torch| / max|torch| over the output",
            "tolerance": tolerance, "batches": results, "max_abs_error": worst_abs, "max_rel_error": worst_rel,
            "passed": bool(worst_rel <= tolerance)}


def export_aoti(model: nn.Module, out: str | os.PathLike, *, device: str = "cpu",
                batches: tuple[int, ...] | list[int] = DEFAULT_BATCHES, fp16: bool = False,
                tolerance: float | None = None, seq_len: int | None = None, seed: int = 0,
                source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile ``model`` (a diffusers UNet2DModel, UNet2DConditionModel or DiTTransformer2DModel)
    into an AOTInductor package at ``out`` for ``device``; return the report also written to
    ``<out>.json``.

    The package accepts any batch from 1 to ``max(batches)`` and is checked at each of ``batches``.
    ``fp16`` (cuda only): float16 weights and compute, float32 inputs and output. ``tolerance``: max
    relative error allowed (default :data:`TOLERANCE`); above it nothing is written and
    :class:`ParityError` is raised.
    """
    batches = tuple(sorted(set(batches))) if isinstance(batches, (list, tuple)) else batches
    check_options(device, batches, fp16, tolerance)
    check_out(out)
    precision = "fp16" if fp16 else "fp32"
    tolerance = float(tolerance if tolerance is not None else TOLERANCE[(device, precision)])
    model = model.eval()
    specs = input_specs(model, seq_len)
    reference = wrap(model, specs)
    with torch.inference_mode():
        out_shape = ["batch", *reference(*random_inputs(specs, 1)).shape[1:]]
    target = copy.deepcopy(model).to(device)
    target = target.half() if fp16 else target
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    usage = ", ".join(s.name for s in specs)
    meta = {"format": "nni-2ndmatch aoti 1", "inputs": ",".join(s.name for s in specs), "output": OUTPUT_NAME}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        start = time.perf_counter()
        program = _export(target, specs, device, fp16, max(batches))
        _compile(program, tmp / out.name, meta)
        seconds = time.perf_counter() - start
        parity = _parity(tmp / out.name, reference, specs, device, batches, seed, tolerance)
        report = {
            "format_version": 1, "file": out.name, "engine": "aotinductor",
            "model": source or {"class": type(model).__name__}, "device": device, "precision": precision,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "batch_range": [1, max(batches)], "inputs": [s.to_json("batch") for s in specs],
            "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": out_shape}],
            "usage": f"torch._inductor.aoti_load_package({out.name!r})({usage})",
            "compile_seconds": seconds, "parity": parity, "versions": versions(),
        }
        publish(tmp, out, report, f"AOTInductor package of {type(model).__name__} ({device}, {precision})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
