"""What the export/ scripts share: logging, and turning errors into exit codes.

Exit codes (``nni_2ndmatch.errors``): 0 success; 1 a failed export (parity above tolerance,
exporter failure); 2 bad input (missing or bad model folder, bad option, engine from another
TensorRT or GPU); 3 TensorRT or a CUDA GPU missing.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from ..errors import ERRORS, report


def run_main(main: Callable[[], int | None]) -> int:
    """Run a script's main; a known error becomes one ``error:`` line on stderr and its exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main() or 0
    except ERRORS as e:
        return report(e)


def batch_list(text: str) -> list[int]:
    """argparse type of --batch: comma-separated positive integers, e.g. 1,16."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive integers")
    return values
