"""What the export/ scripts share: logging, and turning deployment errors into exit codes.

Exit codes: 0 success; 1 a failed export (parity above tolerance, exporter failure); 2 bad input
(missing or bad model folder, bad option, engine from another TensorRT or GPU); 3 TensorRT or a
CUDA GPU missing.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .errors import DeployError, ExportError, MissingBackendError, ParityError


def run_main(main: Callable[[], int | None]) -> int:
    """Run a script's main; a known error becomes one ``error:`` line on stderr and its exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main() or 0
    except (DeployError, ExportError, MissingBackendError, ParityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
