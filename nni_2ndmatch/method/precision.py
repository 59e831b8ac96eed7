"""fp32 precision settings (TF32 on or off) for the Jacobian evaluations, set and restored together.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal

import torch

# fp32 precision settings. torch >= 2.9 has an ``fp32_precision`` per backend and operation beside
# the legacy flags (cudnn.allow_tf32, the float32 matmul precision); reading a legacy flag raises
# once the two disagree, so both are set together, and both are restored.
_PRECISION_OWNERS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
                     "mkldnn.rnn")


def _precision_owners() -> list[Any]:
    owners = []
    for path in _PRECISION_OWNERS:
        owner = torch.backends
        for part in filter(None, path.split(".")):
            owner = getattr(owner, part, None)
        if owner is not None and hasattr(owner, "fp32_precision"):
            owners.append(owner)
    return owners


def precision_state() -> tuple[tuple[Any, ...], tuple[str, ...]]:
    """Every fp32 precision setting: the legacy ones (None where torch refuses to report a mixed
    state) and, on torch >= 2.9, each backend's ``fp32_precision``."""
    legacy = []
    for read in (lambda: torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision):
        try:
            legacy.append(read())
        except RuntimeError:
            legacy.append(None)
    return tuple(legacy), tuple(owner.fp32_precision for owner in _precision_owners())


def _restore_precision(state: tuple[tuple[Any, ...], tuple[str, ...]]) -> None:
    (cudnn_tf32, matmul_precision), values = state
    if cudnn_tf32 is not None:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    if matmul_precision is not None:
        torch.set_float32_matmul_precision(matmul_precision)
    for owner, value in zip(_precision_owners(), values):
        owner.fp32_precision = value


@contextlib.contextmanager
def fp32_precision(precision: Literal["ieee", "tf32"]) -> Iterator[None]:
    """Inside the block fp32 convolutions and matmuls run in ``precision``: ``ieee`` (full fp32, on
    CUDA and in oneDNN on the CPU, which ``set_float32_matmul_precision("medium")`` lets use bf16)
    or ``tf32`` (TF32 allowed). Every setting is restored on exit, also when the block raises."""
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision={precision!r} is not allowed; allowed: ieee, tf32")
    state = precision_state()
    try:
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
        for owner in _precision_owners():
            if owner is not torch.backends:  # the default of the others: left as it is
                owner.fp32_precision = precision
        yield
    finally:
        _restore_precision(state)


@contextlib.contextmanager
def restored_precision(state: tuple[tuple[Any, ...], tuple[str, ...]]) -> Iterator[None]:
    """Inside the block the fp32 precision settings are ``state`` (from :func:`precision_state`);
    the settings before it are restored on exit."""
    before = precision_state()
    try:
        _restore_precision(state)
        yield
    finally:
        _restore_precision(before)
