"""The export stage of a run: teacher and student to ONNX (parity-checked), then their latency on
the backends of the config's ``export`` section. Returns :class:`Latency`; the report draws it."""

from __future__ import annotations

import logging

from torch import nn

from ..config import ExportSection
from ..deploy import export_onnx
from ..deploy.bench import Setup, run_benchmark
from .output import RunFolder
from .results import Latency

logger = logging.getLogger(__name__)


def export_and_benchmark(section: ExportSection, out: RunFolder, teacher: nn.Module, student: nn.Module,
                         seq_len: int | None = None) -> Latency:
    """ONNX files of teacher and student in ``out.onnx``, and their latency on the CPU; ``seq_len``:
    the text tokens of a conditioned model's input (the run's captions': SD3's 77 CLIP + 256 T5)."""
    onnx = {}
    for role, model in (("teacher", teacher), ("student", student)):
        logger.info("exporting the %s to ONNX (opset %d)", role, section.opset)
        file = out.onnx / f"{role}.onnx"
        report = export_onnx(model.eval(), file, opset=section.opset, seq_len=seq_len)
        onnx[role] = {"file": file.relative_to(out.root).as_posix(), "max_rel_error": report["parity"]["max_rel_error"]}
    logger.info("benchmarking teacher vs student on %s, batch %s", ", ".join(section.backends), section.batch)
    setup = Setup(backends=section.backends, batches=section.batch, device="cpu", threads=section.threads,
                  repeats=section.repeats, seq_len=seq_len)
    files = {role: out.root / info["file"] for role, info in onnx.items()}
    return Latency(onnx=onnx, bench=run_benchmark(teacher, student, setup, onnx_files=files))
