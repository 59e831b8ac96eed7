"""Errors of the deployment path, in the package's one hierarchy (``nni_2ndmatch.errors``)."""

from __future__ import annotations

from ..errors import MissingBackendError, RunError, UserError

__all__ = ["DeployError", "EngineMismatchError", "ExportError", "MissingBackendError", "ParityError"]


class DeployError(UserError):
    """Bad input from the user: a missing or unreadable model folder, a bad option (exit 2)."""


class EngineMismatchError(DeployError):
    """A TensorRT engine built for another TensorRT version or GPU (exit 2)."""


class ParityError(RunError):
    """The exported model does not match PyTorch within the tolerance (exit 1)."""


class ExportError(RunError):
    """The exporter failed or produced a graph that breaks the input contract (exit 1)."""
