"""What one forward pass of a model costs, counted from the shapes it runs on: the multiply-adds of
its convolutions, linear layers and attention products, and the entries of its attention score
matrices (the softmax inputs, whose second derivatives dominate a double backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..method.terms import call_model


@dataclass(frozen=True)
class ForwardProfile:
    macs: int  # convolutions, linear layers and the two attention products (QK^T and AV), per sample
    attention_scores: int  # entries of all attention score matrices (heads x queries x keys), per sample

    @property
    def scores_per_mac(self) -> float:
        return self.attention_scores / max(self.macs, 1)


def forward_profile(model: nn.Module, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> ForwardProfile:
    """Run the denoiser at (x, t) with the flat conditioning ``kwargs`` (``method.call_model``) once
    without gradients and count, per sample of the batch, what :class:`ForwardProfile` holds; every
    diffusers ``Attention`` module is counted."""
    from diffusers.models.attention_processor import Attention

    counts = {"macs": 0, "scores": 0}

    def layer(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        counts["macs"] += output.numel() // output.shape[0] * per_output

    def attention(module: nn.Module, args: tuple, kw: dict) -> None:
        hidden = args[0] if args else kw["hidden_states"]
        queries = hidden.shape[1] if hidden.dim() == 3 else hidden.shape[2] * hidden.shape[3]
        context = kw.get("encoder_hidden_states")
        keys = context.shape[1] if context is not None else queries
        counts["macs"] += 2 * queries * keys * module.inner_dim
        counts["scores"] += module.heads * queries * keys

    hooks = [m.register_forward_hook(layer) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks += [m.register_forward_pre_hook(attention, with_kwargs=True) for m in model.modules()
              if isinstance(m, Attention)]
    try:
        with torch.no_grad():
            call_model(model, x, t, kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return ForwardProfile(counts["macs"], counts["scores"])
