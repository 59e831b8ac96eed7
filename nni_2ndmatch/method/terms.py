"""The loss terms of every strategy, each written once, over per-sample tensors.

Reductions follow the reference balance: every squared norm is SUMMED over the C*H*W entries of a
sample and averaged over the batch; with that reduction the reference weights are
lambda_dsm = 1, lambda_kd = 1, lambda_jac = 0.1 (docs/method.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor

from ..utils import is_integer

#: Conditioning that diffusers' SDXL U-Net takes inside ``added_cond_kwargs`` (the pooled text
#: embedding and the six micro-conditioning numbers). The package carries it as flat keyword
#: arguments, one tensor per sample like the others (sliced, repeated, collated and cached alike),
#: and nests it only where a model is called: ``forward_kwargs``.
ADDED_CONDITIONS = ("text_embeds", "time_ids")


def forward_kwargs(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments a diffusers model is called with: ``model_kwargs`` with the
    ADDED_CONDITIONS among them moved into ``added_cond_kwargs``."""
    added = {k: v for k, v in model_kwargs.items() if k in ADDED_CONDITIONS}
    if not added:
        return model_kwargs
    return {**{k: v for k, v in model_kwargs.items() if k not in ADDED_CONDITIONS}, "added_cond_kwargs": added}


#: Conditioning of models whose second positional argument is not the timestep (SD3's transformer:
#: ``forward(hidden_states, encoder_hidden_states, pooled_projections, timestep)``).
TIMESTEP_BY_KEYWORD = ("pooled_projections",)


def call_model(model: Callable[..., Any], x_t: Tensor, timesteps: Tensor, model_kwargs: dict[str, Any]) -> Any:
    """``model`` at (x_t, timesteps) with the flat conditioning ``model_kwargs`` (``forward_kwargs``):
    the timestep positional, or by keyword for the models of TIMESTEP_BY_KEYWORD."""
    kwargs = forward_kwargs(model_kwargs)
    if any(k in kwargs for k in TIMESTEP_BY_KEYWORD):
        return model(x_t, timestep=timesteps, **kwargs)
    return model(x_t, timesteps, **kwargs)


def model_output(model: Callable[..., Any], x_t: Tensor, timesteps: Tensor, **model_kwargs: Any) -> Tensor:
    """Call a noise-prediction model and return its epsilon prediction as a tensor shaped like x_t.

    Accepts modules or callables returning a Tensor, a tuple (first element) or an object with
    ``.sample`` (diffusers). A model predicting 2*C channels (learned variance, as DiT) returns the
    first C channels, which are epsilon. ``model_kwargs`` are flat (``forward_kwargs``).
    """
    out = call_model(model, x_t, timesteps, model_kwargs)
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


#: Per-timestep scales c(t) on both Jacobians before they are compared.
JAC_WEIGHTINGS = ("none", "noise", "x0")


@dataclasses.dataclass(frozen=True)
class TermForm:
    """Which form of the 2ndMatch term :func:`jacobian_term` computes: ``match`` (norm, vector,
    log), ``weighting`` c(t) (none, noise, x0), samples with t below ``min_timestep`` left out, and
    the scale d / ``reference_dims``. The defaults are the paper's term; the measured variant is
    ``TermForm(match="vector", weighting="noise", reference_dims=1)``."""

    match: str = "norm"
    weighting: str = "none"
    min_timestep: int = 0
    reference_dims: int | None = None

    def __post_init__(self) -> None:  # (SecondMatchOptions checks the log pair too, in its own option names)
        if self.match not in JAC_MATCHES:
            raise ValueError(f"match={self.match!r} is not allowed; allowed: {', '.join(JAC_MATCHES)}")
        if self.weighting not in JAC_WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r} is not allowed; allowed: {', '.join(JAC_WEIGHTINGS)}")
        if self.match == "log" and self.weighting != "none":
            raise ValueError(f"weighting={self.weighting!r} is not allowed with match='log' (a per-sample scale "
                             "cancels in a log ratio); allowed: none")
        if not (is_integer(self.min_timestep) and self.min_timestep >= 0):
            raise ValueError(f"min_timestep={self.min_timestep!r} is not allowed; it must be an integer >= 0")
        if self.reference_dims is not None and not (is_integer(self.reference_dims) and self.reference_dims >= 1):
            raise ValueError(f"reference_dims={self.reference_dims!r} is not allowed; it must be an integer >= 1, "
                             "or None")


def jacobian_weight(timesteps: Tensor, weighting: str, scheduler: Any = None,
                    prediction_type: str = "epsilon") -> Tensor:
    """c(t) per sample (float64, on the CPU): ``none`` 1; ``noise`` sqrt(1 - abar_t), the Jacobian
    of the noise component of x_t; ``x0`` the scale at which an error in the prediction reaches
    the predicted clean image, sqrt((1 - abar_t) / abar_t) under epsilon prediction and
    sqrt(1 - abar_t) under v_prediction. Under flow matching both are sigma_t (x_t's noise is
    sigma e, and x0 = x_t - sigma v)."""
    from .schedule import FLOW, noise_scale

    if weighting not in JAC_WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is not allowed; allowed: {', '.join(JAC_WEIGHTINGS)}")
    if weighting == "none":
        return torch.ones(timesteps.shape, dtype=torch.float64)
    s = noise_scale(timesteps, scheduler)
    if weighting == "noise" or prediction_type in ("v_prediction", FLOW):
        return s
    return s / (1.0 - s.pow(2)).sqrt()


def jacobian_term(u_student: Tensor, u_teacher: Tensor, timesteps: Tensor, *, match: str = "norm",
                  weighting: str = "none", scheduler: Any = None, prediction_type: str = "epsilon",
                  min_timestep: int = 0, reference_dims: int | None = None) -> Tensor:
    """The 2ndMatch term from both models' Jacobian products u [B, ...] at ``timesteps`` [B]: each
    product scaled by c(t) (``jacobian_weight``), compared per sample by ``match``
    (``jacobian_match_per_sample``), zero for samples with t below ``min_timestep``, averaged over
    the batch, and multiplied by d / ``reference_dims`` (d = the entries of one sample) when given.
    The defaults are the paper's term."""
    if weighting != "none":
        scale = jacobian_weight(timesteps, weighting, scheduler, prediction_type)
        scale = scale.to(u_student.device, u_student.dtype).view(-1, *([1] * (u_student.dim() - 1)))
        u_student, u_teacher = scale * u_student, scale * u_teacher
    per_sample = jacobian_match_per_sample(u_student, u_teacher, match)
    if min_timestep:
        per_sample = torch.where(timesteps.to(per_sample.device) >= min_timestep, per_sample, 0.0)
    term = per_sample.mean()
    if reference_dims is not None:
        term = term * (u_student[0].numel() / reference_dims)
    return term


def sample_directions(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One random unit direction per sample: v = g / ||g||, g ~ N(0, I) over all C*H*W entries."""
    g = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return g / g.flatten(1).norm(dim=1).view(-1, *([1] * (like.dim() - 1)))
