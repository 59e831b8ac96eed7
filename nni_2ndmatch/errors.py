"""One error hierarchy for the command line and the export scripts, each error with its exit code.

    UserError (exit 2)          bad input: a config field, a model or data folder, an option
      ConfigError               a config with problems, one line each
    RunError (exit 1)           a run that failed: non-finite losses, an export off in parity
    MissingBackendError (3)     an optional runtime (TensorRT, a CUDA GPU) is not available here
    MainProcessFailed           in the other processes of a multi-process run: the main one failed
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UserError(ValueError):
    """A problem with the user's input or environment: reported in one line, no traceback."""

    exit_code = 2


class ConfigError(UserError):
    """A config with problems; ``problems`` holds one line per problem (field path, value, allowed)."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


class RunError(RuntimeError):
    """A run that started and failed."""

    exit_code = 1


class NonFiniteLossError(RunError):
    """Raised after too many steps with a non-finite loss; the last good checkpoint is kept."""


class MissingBackendError(RuntimeError):
    """An optional runtime (TensorRT, a CUDA GPU) is not available here."""

    exit_code = 3


class MainProcessFailed(Exception):
    """Raised in the other processes of a multi-process run when the main process failed at work
    that only it does (``Runtime.on_main``): the main process reports the error; the others exit
    with its code and print nothing."""

    def __init__(self, exit_code: int) -> None:
        self.exit_code = exit_code
        super().__init__(f"the main process failed (exit code {exit_code})")


ERRORS = (UserError, RunError, MissingBackendError, MainProcessFailed)


@contextlib.contextmanager
def user_errors(field: str, *kinds: type[Exception]) -> Iterator[None]:
    """Inside: a ValueError (or one of ``kinds``, e.g. OSError for files) raised by library code
    becomes a UserError naming the config ``field`` it concerns; a UserError passes unchanged."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, *kinds) as e:
        raise UserError(f"{field}: {e}") from None


def report(error: BaseException) -> int:
    """One ``error:`` line (or block) on stderr; returns the error's exit code. (Nothing for
    ``MainProcessFailed``: the main process reported it.)"""
    if not isinstance(error, MainProcessFailed):
        print(f"error: {error}", file=sys.stderr)
    return getattr(error, "exit_code", 1)
