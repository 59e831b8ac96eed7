"""Every use of a private torch or diffusers internal, in one place, each with the versions it was
checked against (torch 2.11 and 2.13; diffusers 0.42). ``tests/test_package.py`` checks that each
still exists in the installed versions, so an upgrade that removes one fails there, not in a run.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHECKED = {"torch": ("2.11", "2.13"), "diffusers": ("0.42",)}


def current_sdpa_backends() -> list[Any]:
    """The scaled-dot-product-attention backends in force now (``sdpa_kernel``'s state), to enter
    again during a recomputation. torch.nn.attention._cur_sdpa_kernel_backends (torch 2.11, 2.13)."""
    from torch.nn.attention import _cur_sdpa_kernel_backends

    return _cur_sdpa_kernel_backends()


def at_end_of_backward(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the backward pass now running ends.
    torch.autograd.Variable._execution_engine.queue_callback (torch 2.11, 2.13)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def lerp_all_(tensors: Sequence[Tensor], ends: Sequence[Tensor], weight: float) -> None:
    """In place, each ``t += weight * (end - t)``, fused over the list. torch._foreach_lerp_ (torch 2.11, 2.13)."""
    torch._foreach_lerp_(list(tensors), list(ends), weight)


def supports_gradient_checkpointing(model: nn.Module) -> bool:
    """Whether a diffusers model can recompute its blocks. ModelMixin._supports_gradient_checkpointing
    (diffusers 0.42)."""
    return bool(getattr(model, "_supports_gradient_checkpointing", False))


def registered_config(model: nn.Module) -> Any:
    """A diffusers model's registered config as stored (to put back after ``register_to_config``).
    ConfigMixin._internal_dict (diffusers 0.42)."""
    return model._internal_dict


def restore_registered_config(model: nn.Module, config: Any) -> None:
    model._internal_dict = config


def retype(obj: nn.Module, cls: type) -> None:
    """Make ``obj`` an instance of ``cls``, a subclass of its own class (or its own class again)
    that adds no state: the pruned classes, which diffusers loads by name (``__class__``
    assignment, plain Python; listed here as the one place that does it)."""
    obj.__class__ = cls


def _upsample_forward(self: nn.Module, hidden_states: Tensor, output_size: Any = None, *args: Any,
                      **kwargs: Any) -> Tensor:
    """diffusers' Upsample2D.forward (diffusers 0.42) without its batch-size branch (a memory-layout
    workaround for batches >= 64: a channels-last input is made contiguous, which can move the
    convolution's results by float rounding); the same ops in the same order otherwise, so
    below 64 the results are bit for bit diffusers'."""
    if self.norm is not None:
        hidden_states = self.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if self.use_conv_transpose:
        return self.conv(hidden_states)
    if self.interpolate:
        size = {"scale_factor": 2.0} if output_size is None else {"size": output_size}
        hidden_states = F.interpolate(hidden_states, mode="nearest", **size)
    if self.use_conv:
        hidden_states = (self.conv if self.name == "conv" else self.Conv2d_0)(hidden_states)
    return hidden_states


@contextlib.contextmanager
def batch_independent(model: nn.Module) -> Iterator[None]:
    """While tracing: diffusers' Upsample2D branches on ``batch >= 64``, which would split a
    traced batch axis at 64; inside the block its layers run a copy of its forward without that
    branch (the export's parity check compares the result with the original model)."""
    from diffusers.models.upsampling import Upsample2D

    layers = [m for m in model.modules() if type(m) is Upsample2D]
    for layer in layers:
        layer.forward = _upsample_forward.__get__(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
