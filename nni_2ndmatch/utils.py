"""Small helpers shared by every layer: parameter flags, and the words of clear error messages."""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Iterator, TypeVar

from torch import nn


@contextlib.contextmanager
def requires_grad(model: Any, flag: bool) -> Iterator[None]:
    """Inside the block every parameter of ``model`` (an nn.Module; anything else is left alone)
    has ``requires_grad=flag``; each parameter's own flag is restored on exit, also on error."""
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(flag)
        yield
    finally:
        for p, was in zip(params, saved):
            p.requires_grad_(was)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (YAML and JSON booleans are ints to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def did_you_mean(value: Any, choices: list[str], n: int = 1) -> str:
    """'; did you mean 'x'?' for the nearest choices to a misspelt value, or ''."""
    close = difflib.get_close_matches(value, choices, n=n) if isinstance(value, str) else []
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def differs_from_default(model: Any, key: str) -> bool:
    """Whether a pydantic model's field ``key`` holds another value than its default: what a user
    set (a written-out config repeats the defaults, so "given" alone cannot tell)."""
    return getattr(model, key) != type(model).model_fields[key].default


def json_kind(value: Any) -> str:
    """What a parsed JSON or YAML value is, in words: 'an object', 'a list', ..."""
    if isinstance(value, bool):
        return "a boolean"
    kinds = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
             type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def validation_errors(error: Any) -> list[tuple[str | None, str, Any, str]]:
    """Each problem of a pydantic ``ValidationError`` over a flat set of options: (the option's
    name, None for a rule across options; pydantic's error type; the value given; the message,
    without pydantic's "Value error, ")."""
    return [(str(e["loc"][0]) if e["loc"] else None, e["type"], e.get("input"),
             e["msg"].removeprefix("Value error, ")) for e in error.errors()]


T = TypeVar("T")


def add_unique(registry: dict[str, T], name: str, item: T, what: str) -> T:
    """``registry[name] = item``; a name already there is a ValueError (``what``: the kind of item)."""
    if name in registry:
        raise ValueError(f"{what} {name!r} is already registered")
    registry[name] = item
    return item
