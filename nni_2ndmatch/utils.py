"""Small helpers shared by the method, the loop and the pruning surgery."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

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
