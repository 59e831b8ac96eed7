"""PyTorch -> ONNX, checked against PyTorch before anything is written.

The graph takes the contract of :mod:`.model_io` with one dynamic ``batch`` axis. It is checked
with ``onnx.checker``, simplified with onnxslim only where that leaves outputs bit-identical, and
run in onnxruntime (CPU) on fresh random inputs at batch 1 and 3; the errors against PyTorch fp32
go into a sidecar ``<out>.json``. Above tolerance nothing is written and :class:`ParityError` is
raised. Graphs over 2 GB keep their weights in ``<out>.data`` (ONNX external data).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils import is_integer
from .artefact import check_out, publish
from .errors import DeployError, ExportError
from .model_io import (
    OUTPUT_NAME,
    InputSpec,
    input_specs,
    random_inputs,
    wrap,
)

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 20  # TensorRT-safe: TensorRT parses the native Attention op (opset 23) only from 10.14
EXPORTERS = ("dynamo", "torchscript")
#: The dynamo exporter writes opset-18 operators (Split with num_outputs, in any attention) even
#: below opset 18, which onnxruntime and TensorRT then reject: it needs 18 or newer.
DYNAMO_MIN_OPSET = 18
#: Max |onnx - torch| / max |torch| allowed, per precision.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
CHECK_BATCHES = (1, 3)
#: Protobuf caps a serialized model at 2 GiB; keep room for the graph itself.
EXTERNAL_DATA_BYTES = 2**31 - 2**27

def check_options(opset: int, exporter: str, tolerance: float | None, *, exporter_fixed: bool = False) -> None:
    """An export's options, checked before any work (a DeployError naming the option).
    ``exporter_fixed``: the caller allows no other exporter (the message offers none)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not is_integer(opset) or not 14 <= opset <= newest:
        raise DeployError(f"opset={opset!r} is not allowed; it must be an integer in [14, {newest}] "
                          f"(default {DEFAULT_OPSET})")
    if exporter not in EXPORTERS:
        raise DeployError(f"exporter={exporter!r} is unknown; allowed: {', '.join(EXPORTERS)}")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise DeployError(f"opset={opset} is not allowed with the dynamo exporter, which writes opset-"
                          f"{DYNAMO_MIN_OPSET} operators (Split's num_outputs in attention) that an older opset "
                          f"rejects; allowed: {DYNAMO_MIN_OPSET} to {newest}"
                          + ("" if exporter_fixed else ", or 14 to 17 with the torchscript exporter"))
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise DeployError(f"tolerance={tolerance!r} is not allowed; it must be a number > 0")


@contextlib.contextmanager
def quiet_exporter():
    """The exporters' tracer warnings and notes about unrelated operator libraries."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(wrapper: nn.Module, specs: list[InputSpec], opset: int, exporter: str, batch_dynamic: bool,
            workdir: Path):
    """Run an exporter; returns the ModelProto (weights in memory)."""
    import onnx

    args = tuple(random_inputs(specs, 2 if batch_dynamic else 1))  # batch 2: exporters specialise 0 and 1
    names = [s.name for s in specs]
    axes = {n: {0: "batch"} for n in [*names, OUTPUT_NAME]} if batch_dynamic else None
    try:
        with quiet_exporter(), torch.inference_mode(False), torch.no_grad():
            if exporter == "dynamo":
                program = torch.onnx.export(wrapper, args, input_names=names, output_names=[OUTPUT_NAME],
                                            opset_version=opset, dynamo=True, dynamic_axes=axes, verbose=False)
                return program.model_proto
            path = workdir / "torchscript.onnx"  # a file: the exporter handles > 2 GB itself
            torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=False, dynamic_axes=axes)
            return onnx.load(str(path))
    except Exception as e:  # the exporters raise many types; all mean the same to the user
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise ExportError(f"the {exporter} exporter failed on {type(wrapper.model).__name__}: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
                          f"(try --exporter {other})") from e


def _dims(value_info) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _check_io(proto, specs: list[InputSpec], batch_dynamic: bool) -> None:
    """The graph's inputs and output are the contract: in particular ``timestep`` is a real float32
    [B] input, not a constant the exporter folded in."""
    import onnx

    inputs = {i.name: i for i in proto.graph.input}
    names = [i.name for i in proto.graph.input]
    if "timestep" not in inputs:
        raise ExportError(f"the exported graph has no timestep input (inputs: {names}): the exporter baked the "
                          "timestep into the graph as a constant")
    if names != [s.name for s in specs]:
        raise ExportError(f"the exported graph's inputs are {names}; expected {[s.name for s in specs]}")
    batch = "batch" if batch_dynamic else 1
    for spec in specs:
        info = inputs[spec.name]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type).name
        if dtype != spec.dtype or _dims(info) != [batch, *spec.shape]:
            raise ExportError(f"input {spec.name}: {dtype} {_dims(info)} in the graph; expected "
                              f"{spec.dtype} {[batch, *spec.shape]}")
    outs = [o.name for o in proto.graph.output]
    out_type = proto.graph.output[0].type.tensor_type.elem_type if outs else None
    if outs != [OUTPUT_NAME] or out_type != onnx.TensorProto.FLOAT:
        raise ExportError(f"the exported graph's outputs are {outs}; expected one float32 output {OUTPUT_NAME!r}")


def ort_session(model: bytes | str | os.PathLike, threads: int | None = None, providers: list | None = None):
    """An onnxruntime session (CPU unless ``providers``), all graph optimisations on."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own types (InvalidGraph, Fail, ...): the graph is not runnable
        raise ExportError(f"onnxruntime cannot run the graph: {str(e).strip().splitlines()[0]}") from e


def _run(session, specs: list[InputSpec], inputs: list[torch.Tensor]) -> np.ndarray:
    feeds = {s.name: t.cpu().numpy() for s, t in zip(specs, inputs)}
    return session.run([OUTPUT_NAME], feeds)[0]


def _slim(proto, specs: list[InputSpec], checks: dict[int, list[torch.Tensor]]) -> tuple[Any, str]:
    """onnxslim's graph where its outputs equal the original's bit for bit; else the original."""
    try:
        import onnxslim
    except ImportError:  # a dependency: its absence is a broken install, not a reason to skip a step
        raise ExportError("onnxslim, a dependency of nni-2ndmatch, is not installed: pip install onnxslim "
                          "(or export with simplify=False)") from None

    before = len(proto.graph.node)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slim = onnxslim.slim(copy.deepcopy(proto))
    except Exception as e:  # noqa: BLE001 - an optional optimiser: its failure must not fail the export
        logger.warning("onnxslim failed (%s: %s); the graph is kept as exported", type(e).__name__, e)
        return proto, f"not simplified: onnxslim failed ({type(e).__name__})"
    original, simplified = ort_session(proto.SerializeToString()), ort_session(slim.SerializeToString())
    for batch, inputs in checks.items():
        a, b = _run(original, specs, inputs), _run(simplified, specs, inputs)
        if not np.array_equal(a, b):
            diff = float(np.abs(a - b).max())
            logger.info("onnxslim changed the outputs (max abs %.3g at batch %d): the graph is kept as exported",
                        diff, batch)
            return proto, f"not simplified: onnxslim changed the outputs (max abs {diff:.3g})"
    logger.info("onnxslim: %d -> %d nodes, outputs identical", before, len(slim.graph.node))
    return slim, f"simplified by onnxslim: {before} -> {len(slim.graph.node)} nodes, outputs identical"


def errors_against(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    if got.shape != want.shape or not np.isfinite(got).all():
        return {"max_abs_error": float("inf"), "max_rel_error": float("inf")}
    abs_err = float(np.abs(got.astype(np.float64) - want).max())
    return {"max_abs_error": abs_err, "max_rel_error": abs_err / max(float(np.abs(want).max()), 1e-30)}


def _parity(path: Path, reference: nn.Module, specs: list[InputSpec], checks: dict[int, list[torch.Tensor]],
            tolerance: float) -> dict[str, Any]:
    session = ort_session(path)
    batches = {}
    for batch, inputs in checks.items():
        with torch.inference_mode():
            want = reference(*inputs).double().numpy()
        batches[str(batch)] = errors_against(_run(session, specs, inputs), want)
    worst_abs = max(b["max_abs_error"] for b in batches.values())
    worst_rel = max(b["max_rel_error"] for b in batches.values())
    return {"reference": "PyTorch fp32, CPU", "runtime": "onnxruntime CPUExecutionProvider",
            "metric": "max_rel_error = max|onnx - torch| / max|torch| over the output",
            "tolerance": tolerance, "batches": batches, "max_abs_error": worst_abs, "max_rel_error": worst_rel,
            "passed": bool(worst_rel <= tolerance)}


def _weight_bytes(model: nn.Module, fp16: bool) -> int:
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return total // 2 if fp16 else total


def _save(proto, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        path.write_bytes(proto.SerializeToString())


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of the packages an exported file depends on."""
    return {name: package_version(name) for name in ("torch", "onnx", "onnxruntime", "onnxscript", "onnxslim",
                                                      "diffusers")}


def export_onnx(model: nn.Module, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET, fp16: bool = False,
                batch_dynamic: bool = True, exporter: str = "dynamo", simplify: bool = True,
                tolerance: float | None = None, seq_len: int | None = None,
                source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``model`` (a diffusers UNet2DModel, UNet2DConditionModel or DiTTransformer2DModel) to
    ``out`` and return the report also written to ``<out>.json``.

    ``fp16``: float16 weights and compute, float32 inputs and output (cast inside the graph).
    ``tolerance``: max relative error allowed (default :data:`TOLERANCE` of the precision); above it
    nothing is written and :class:`ParityError` is raised.
    """
    check_options(opset, exporter, tolerance)
    check_out(out)
    precision = "fp16" if fp16 else "fp32"
    tolerance = float(tolerance if tolerance is not None else TOLERANCE[precision])
    model = model.eval()
    specs = input_specs(model, seq_len)
    reference = wrap(model, specs)
    target = wrap(copy.deepcopy(model).half(), specs, half=True) if fp16 else reference
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    external = _weight_bytes(model, fp16) > EXTERNAL_DATA_BYTES
    batches = CHECK_BATCHES if batch_dynamic else (1,)
    checks = {b: random_inputs(specs, b, seed=1 + b) for b in batches}  # not the export's inputs
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        proto = _export(target, specs, opset, exporter, batch_dynamic, tmp)
        _check_io(proto, specs, batch_dynamic)
        if not simplify:
            note = "not simplified: simplify=False"
        elif external:
            note = "not simplified: external-data model (over 2 GB)"
        else:
            proto, note = _slim(proto, specs, checks)
        _save(proto, tmp / out.name, external)
        import onnx

        onnx.checker.check_model(str(tmp / out.name))  # by path: works with external data
        parity = _parity(tmp / out.name, reference, specs, checks, tolerance)
        report = {
            "format_version": 1, "file": out.name, "external_data": (out.name + ".data") if external else None,
            "model": source or {"class": type(model).__name__}, "exporter": exporter, "opset": opset,
            "precision": precision, "batch_dynamic": batch_dynamic,
            "inputs": [s.to_json("batch" if batch_dynamic else 1) for s in specs],
            "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": _dims(proto.graph.output[0])}],
            "nodes": len(proto.graph.node), "simplified": note.startswith("simplified"), "simplify_note": note,
            "parity": parity, "versions": versions(),
        }
        data = out.with_name(out.name + ".data")
        publish(tmp, out, report, f"ONNX export of {type(model).__name__} ({precision})",
                companions=(data.name,) if external else ())
        if not external:  # a stale data file of an earlier export
            data.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
