"""The end of the ONNX and AOTInductor exports: the artefact moves into place only when its parity
check passed, synced and atomically, and its report is written beside it as JSON. A TensorRT engine
is written atomically too, but with no parity check (docs/deployment.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..files import atomic_write_json
from .errors import DeployError, ParityError

SIDECAR_SUFFIX = ".json"


def sidecar_path(artefact: str | os.PathLike) -> Path:
    """Where an artefact's report goes: its name with ``.json`` added (``student.onnx.json``)."""
    path = Path(artefact)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def check_out(out: str | os.PathLike) -> None:
    """Before an export's work: ``out`` must be able to become a file (a DeployError if not)."""
    if Path(out).is_dir():
        raise DeployError(f"out={str(out)!r} is a folder; give the path of the file to write")


def publish(tmp: Path, out: Path, report: dict[str, Any], what: str, companions: tuple[str, ...] = ()) -> None:
    """Move ``out.name`` (and first its ``companions``, e.g. an external-data file) from the folder
    ``tmp`` to ``out``'s folder, then write ``report`` as its sidecar. A report whose parity check
    failed is a :class:`ParityError` naming ``what``, and nothing is written."""
    parity = report["parity"]
    if not parity["passed"]:
        raise ParityError(f"{what} does not match PyTorch: max relative error {parity['max_rel_error']:.3g} > "
                          f"tolerance {parity['tolerance']:.3g} (max abs {parity['max_abs_error']:.3g}); "
                          "nothing was written")
    for name in (*companions, out.name):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp / name, out.with_name(name))
    atomic_write_json(sidecar_path(out), report)
