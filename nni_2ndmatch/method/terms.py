"""The loss terms of every strategy, each written once, over per-sample tensors.

Reductions follow the reference balance: every squared norm is SUMMED over the C*H*W entries of a
sample and averaged over the batch; with that reduction the reference weights are
lambda_dsm = 1, lambda_kd = 1, lambda_jac = 0.1 (docs/method.md).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def model_output(model: Callable[..., Any], x_t: Tensor, timesteps: Tensor, **model_kwargs: Any) -> Tensor:
    """Call a noise-prediction model and return its epsilon prediction as a tensor shaped like x_t.

    Accepts modules or callables returning a Tensor, a tuple (first element) or an object with
    ``.sample`` (diffusers). A model predicting 2*C channels (learned variance, as DiT) returns the
    first C channels, which are epsilon.
    """
    out = model(x_t, timesteps, **model_kwargs)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"model returned {type(out).__name__}; expected a Tensor or an object with .sample")
    channels = x_t.shape[1]
    if out.dim() == x_t.dim() and out.shape[1] == 2 * channels and out.shape[2:] == x_t.shape[2:]:
        out = out[:, :channels]
    if out.shape != x_t.shape:
        raise ValueError(f"model output has shape {tuple(out.shape)}, input x_t has {tuple(x_t.shape)}; "
                         "a noise-prediction model must return the shape of its input")
    return out


def squared_norm(x: Tensor) -> Tensor:
    """Per-sample squared L2 norm, summed over all non-batch entries: [B, ...] -> [B]."""
    return x.flatten(1).pow(2).sum(dim=1)


def dsm_term(eps_student: Tensor, noise: Tensor) -> Tensor:
    """Denoising score matching: ||eps_S - eps||^2, summed over pixels, mean over the batch."""
    return squared_norm(eps_student - noise).mean()


def kd_term(eps_student: Tensor, eps_teacher: Tensor) -> Tensor:
    """Output distillation: ||eps_S - sg(eps_T)||^2, summed over pixels, mean over the batch."""
    return squared_norm(eps_student - eps_teacher.detach()).mean()


def jacobian_match_term(s_student: Tensor, s_teacher: Tensor) -> Tensor:
    """The 2ndMatch term from per-sample sensitivities [B]: mean of (s_S - sg(s_T))^2."""
    return (s_student - s_teacher.detach()).pow(2).mean()


#: How the 2ndMatch term compares the student's Jacobian product u_S with the teacher's u_T.
JAC_MATCHES = ("norm", "vector", "log")


def jacobian_match_per_sample(u_student: Tensor, u_teacher: Tensor, match: str = "norm") -> Tensor:
    """Per-sample distance, Tensor[B], between Jacobian products u = J v (or J^T v), [B, ...]:

    - ``norm`` (the paper): (||u_S||^2 - sg(||u_T||^2))^2, one number per sample compared;
    - ``vector`` (Jacobian matching, Sobolev training): ||u_S - sg(u_T)||^2, summed over entries;
    - ``log`` (relative, scale-free across t): (log ||u_S||^2 - log sg(||u_T||^2))^2.
    """
    if match == "vector":
        return squared_norm(u_student - u_teacher.detach())
    s_student, s_teacher = squared_norm(u_student), squared_norm(u_teacher.detach())
    if match == "norm":
        return (s_student - s_teacher).pow(2)
    if match == "log":
        return (s_student.log() - s_teacher.log()).pow(2)
    raise ValueError(f"match={match!r} is not allowed; allowed: {', '.join(JAC_MATCHES)}")


def sample_directions(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One random unit direction per sample: v = g / ||g||, g ~ N(0, I) over all C*H*W entries."""
    g = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return g / g.flatten(1).norm(dim=1).view(-1, *([1] * (like.dim() - 1)))
