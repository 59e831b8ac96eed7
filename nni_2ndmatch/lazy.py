"""Packages whose public names are imported on first use: ``import nni_2ndmatch`` (a command
line's start, a data loader worker's) then costs no torch or diffusers import.

A package lists its public names once, as imports under ``if TYPE_CHECKING:`` in its
``__init__.py``: type checkers and editors read them there, with their signatures; at run time,
``lazy_exports`` reads the same block (through the package's loader, so from a zip too) and
imports each name when it is first used."""

from __future__ import annotations

import ast
import importlib
import sys
from typing import Any, Callable


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def type_checking_imports(source: str) -> dict[str, tuple[str, str | None]]:
    """name -> (the relative module, the attribute it is; None: the module itself), for each import
    under ``if TYPE_CHECKING:`` at the top level of ``source``."""
    exports: dict[str, tuple[str, str | None]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for item in node.body:
                if not (isinstance(item, ast.ImportFrom) and item.level):
                    raise TypeError(f"line {item.lineno}: under TYPE_CHECKING, only relative 'from . import' lines")
                module = "." * item.level + (item.module or "")
                for alias in item.names:
                    exports[alias.asname or alias.name] = \
                        (module, alias.name) if item.module else (module + alias.name, None)  # from . import sub
    return exports


def lazy_exports(package: str) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """A module ``__getattr__``, ``__dir__`` and ``__all__`` for ``package``: each name its
    ``__init__.py`` imports under ``if TYPE_CHECKING:`` is imported on first use and kept in the package."""
    source = sys.modules[package].__loader__.get_source(package)
    if source is None:
        raise ImportError(f"{package}: its __init__.py source is not installed, and it lists the package's names")
    exports = type_checking_imports(source)
    if not exports:
        raise ImportError(f"{package}: its __init__.py has no 'if TYPE_CHECKING:' imports (its public names)")

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = exports[name]
        value = importlib.import_module(module, package)
        value = value if attribute is None else getattr(value, attribute)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__, sorted(exports)
