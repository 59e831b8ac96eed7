"""Errors of the deployment path, each with the exit code its command line returns."""

from __future__ import annotations


class DeployError(ValueError):
    """Bad input from the user: a missing or unreadable model folder, a bad option (exit 2)."""

    exit_code = 2


class ParityError(RuntimeError):
    """The exported model does not match PyTorch within the tolerance (exit 1)."""

    exit_code = 1


class MissingBackendError(RuntimeError):
    """An optional runtime (TensorRT, a CUDA GPU) is not available here (exit 3)."""

    exit_code = 3


class EngineMismatchError(DeployError):
    """A TensorRT engine built for another TensorRT version or GPU (exit 2)."""


class ExportError(RuntimeError):
    """The exporter failed or produced a graph that breaks the input contract (exit 1)."""

    exit_code = 1
