"""Argument types the benchmark scripts share, so that a bad value is refused at parsing (exit 2,
naming the flag, the value and what is allowed) and not after the work it would spoil."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path


def count(minimum: int = 1) -> Callable[[str], int]:
    """An integer of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not allowed: it must be >= {minimum}")
        return value
    return parse


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: it must be between 0 and 1 (both excluded)")
    return value


def model_folder(text: str) -> str:
    """A diffusers model folder (one with a config.json)."""
    if not (Path(text) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a diffusers model folder (it has no config.json)")
    return text


def names(allowed: Iterable[str], required: Iterable[str] = ()) -> Callable[[str], list[str]]:
    """A comma-separated list of distinct names from ``allowed`` that holds every one of ``required``."""
    allowed, required = list(allowed), list(required)

    def parse(text: str) -> list[str]:
        given = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in given if n not in allowed]
        if unknown or not given:
            raise argparse.ArgumentTypeError(f"{text!r}: {', '.join(unknown) or 'no name'} is not allowed; "
                                             f"choose from {', '.join(allowed)}")
        twice = sorted({n for n in given if given.count(n) > 1})
        if twice:
            raise argparse.ArgumentTypeError(f"{text!r} names {', '.join(twice)} twice")
        missing = [n for n in required if n not in given]
        if missing:
            raise argparse.ArgumentTypeError(f"{text!r} lacks {', '.join(missing)}, which the others are "
                                             "measured against")
        return given
    return parse
