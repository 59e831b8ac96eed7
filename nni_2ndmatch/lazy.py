"""Packages whose public names are imported on first use: ``import nni_2ndmatch`` (a command
line's start, a data loader worker's) then costs no torch or diffusers import.

A package lists its public names once, as imports under ``if TYPE_CHECKING:`` in its
``__init__.py``: type checkers and editors read them there, with their signatures; at run time,
``lazy_exports`` reads the same block and imports each name when it is first used."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path
from typing import Any, Callable


def _type_checking_imports(source: str) -> dict[str, str]:
    """name -> the relative module it comes from, for each ``from .module import name`` under
    ``if TYPE_CHECKING:`` at the top level of ``source``."""
    exports: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for item in node.body:
                if not (isinstance(item, ast.ImportFrom) and item.level):
                    raise TypeError(f"line {item.lineno}: under TYPE_CHECKING, only relative 'from . import' lines")
                exports.update({alias.name: "." * item.level + (item.module or "") for alias in item.names})
    return exports


def lazy_exports(package: str) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """A module ``__getattr__``, ``__dir__`` and ``__all__`` for ``package``: each name its
    ``__init__.py`` imports under ``if TYPE_CHECKING:`` is imported on first use and kept in the package."""
    exports = _type_checking_imports(Path(sys.modules[package].__file__).read_text(encoding="utf-8"))

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__, sorted(exports)
