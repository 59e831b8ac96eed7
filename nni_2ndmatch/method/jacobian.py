"""Jacobian-sensitivity estimators, s = ||J v||^2 with J = d eps(x_t, t) / d x_t per sample and v a
unit direction per sample, and the 2ndMatch term mean_b (s_student - s_teacher)^2 (docs/method.md).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Literal

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..compat import at_end_of_backward, current_sdpa_backends
from ..scoped import rng_replay
from ..utils import requires_grad
from .precision import fp32_precision, precision_state, restored_precision
from .schedule import prediction_of
from .terms import TermForm, jacobian_term, model_output, sample_directions, squared_norm

#: The estimators of the Jacobian product, defined here once: ``vjp`` (reverse mode, J^T v, the
#: default everywhere), ``jvp`` (forward mode, J v, the paper's form) and ``fd`` (central difference).
MODES: tuple[str, ...] = ("vjp", "jvp", "fd")
Mode = Literal["vjp", "jvp", "fd"]
DEFAULT_MODE = "vjp"


#: Default step of the central finite difference, along a UNIT direction v in the input space.
#: Its truncation error is O(h^2) (third derivatives of the network); in fp32 the round-off error
#: grows like eps_machine / h. See tests/test_losses.py for the measured error.
DEFAULT_FD_STEP = 1e-2


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    # GroupNorm's forward-mode AD rule fails on non-contiguous inputs/tangents (diffusers' attention
    # feeds it a transposed tensor); a contiguous copy is the same function.
    return (args[0].contiguous(),) + tuple(args[1:])


def needs_math_attention(mode: str, create_graph: bool) -> bool:
    """Whether an estimate differentiates attention twice (or in forward mode), which the fused
    attention kernels cannot: ``jvp`` always, ``vjp`` when its graph is kept (the student's
    double backward), ``fd`` never (its evaluations are plain forward passes, backpropagated once)."""
    return mode == "jvp" or (mode == "vjp" and create_graph)


@contextlib.contextmanager
def jacobian_safe(*models: Any, math_attention: bool = True) -> Iterator[None]:
    """Make Jacobian products (forward mode and double backward) work on diffusers models.

    Inside the block: with ``math_attention``, scaled-dot-product attention uses the math backend
    (the fused kernels have neither forward-mode AD nor double backward; ``needs_math_attention``
    says when that matters); every GroupNorm gets a contiguous input, and autocast is off (the
    Jacobian term is 4th order in J: it stays in the model's own precision). Everything is undone
    on exit, also when the block raises; the models are not otherwise changed.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with contextlib.ExitStack() as stack:
        if math_attention:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        for model in models:
            if isinstance(model, nn.Module):
                for module in model.modules():
                    if isinstance(module, nn.GroupNorm):
                        stack.callback(module.register_forward_pre_hook(_contiguous_input).remove)
        yield


def checkpoint_as_forward(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Gradient checkpointing (``torch.utils.checkpoint``, non-reentrant) whose recomputation, which
    runs inside the backward pass, uses the attention backends and fp32 precision settings of the
    forward pass it repeats. A Jacobian evaluation's forward runs under :func:`jacobian_safe` (math
    attention) or ``fp32_precision``; recomputed under other settings it would save other tensors
    (an error) or other values. For ``model.enable_gradient_checkpointing(checkpoint_as_forward)``;
    exact for ``vjp`` and ``fd`` (tested against the unchecked gradient in float64); forward mode
    (``jvp``) cannot go through a recomputation."""
    from torch.nn.attention import sdpa_kernel

    backends, precision = current_sdpa_backends(), precision_state()

    class AsForward:  # entered once per recomputation (a double backward recomputes twice)
        def __enter__(self) -> None:
            self.stack = contextlib.ExitStack()
            self.stack.enter_context(sdpa_kernel(backends))
            self.stack.enter_context(restored_precision(precision))

        def __exit__(self, *exc: Any) -> None:
            self.stack.close()

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                             context_fn=lambda: (contextlib.nullcontext(), AsForward()), **kwargs)


def _ieee_backward(grad: Tensor) -> Tensor:
    """Hook on a finite difference with a graph: the rest of this backward pass, which goes through
    the perturbed evaluations, runs in full fp32 too (TF32 would cancel the difference there as in
    the forward); the settings are restored when the pass ends."""
    before = precision_state()
    guard = contextlib.ExitStack()
    guard.enter_context(fp32_precision("ieee"))
    if precision_state() == before:  # already full fp32: the user's setting, or another difference's hook
        guard.close()
    else:
        at_end_of_backward(guard.close)
    return grad


def output_and_product(model: Callable[..., Any], x_t: Tensor, timesteps: Tensor, v: Tensor,
                       mode: str = DEFAULT_MODE, *, create_graph: bool = True,
                       fd_step: float = DEFAULT_FD_STEP, **model_kwargs: Any) -> tuple[Tensor, Tensor]:
    """The model's output at x_t and the Jacobian product u = J v (``jvp``, ``fd``) or J^T v
    (``vjp``), shaped like x_t; the sensitivity is ``squared_norm(u)``.

    Must run inside ``jacobian_safe``. The output comes from the same evaluation as the Jacobian
    product where the mode allows it (jvp, vjp), so callers reuse it for their other loss terms.
    With ``create_graph=False`` both are detached: the teacher's case, where no graph is built to
    the parameters and no parameter ever receives ``.grad``.

    - ``jvp``: J v by forward-mode AD (torch.func.jvp): one pass carrying primal and tangent.
    - ``vjp``: J^T v by reverse mode (grad of <eps, v> w.r.t. x_t); trained by double backward.
    - ``fd``: (eps(x + h v) - eps(x - h v)) / (2h), a central difference with O(h^2) error; the
      output is a third evaluation. All three evaluations use the same dropout mask and run in
      full fp32, without TF32 (``fp32_precision("ieee")``), and so does the backward pass through
      them. A finite difference perturbs each input entry by about h / sqrt(C*H*W) (1.8e-4 for a
      32x32 RGB image at h = 1e-2), below TF32's resolution (about 1e-3 relative), and PyTorch
      allows TF32 in cuDNN convolutions by default.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a Jacobian estimator; allowed: {', '.join(MODES)}")
    if v.shape != x_t.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}, x_t has {tuple(x_t.shape)}; they must match")
    if mode == "fd" and not 0 < fd_step < 1:
        raise ValueError(f"fd_step={fd_step!r} is not allowed; it must be in (0, 1) (default {DEFAULT_FD_STEP})")

    def f(x: Tensor) -> Tensor:
        return model_output(model, x, timesteps, **model_kwargs)

    grad_ctx = torch.enable_grad() if create_graph else torch.no_grad()
    if mode == "jvp":
        with grad_ctx:
            out, jv = torch.func.jvp(f, (x_t.detach(),), (v,))
        return out, jv
    if mode == "vjp":
        x = x_t.detach().requires_grad_(True)
        with torch.enable_grad(), (contextlib.nullcontext() if create_graph else requires_grad(model, False)):
            out = f(x)
            (jtv,) = torch.autograd.grad(out, x, v, create_graph=create_graph)
        if not create_graph:
            out, jtv = out.detach(), jtv.detach()
        return out, jtv
    # fd: replay the same random state for every evaluation so that dropout masks agree; the
    # generator ends where one ordinary evaluation would have left it.
    rewind = rng_replay(x_t.device)

    def replay(x: Tensor) -> Tensor:
        rewind()
        return f(x)

    x = x_t.detach()
    with grad_ctx, fp32_precision("ieee"):
        diff = (replay(x + fd_step * v) - replay(x - fd_step * v)) / (2.0 * fd_step)
        out = replay(x)
    if diff.requires_grad:
        diff.register_hook(_ieee_backward)
    return out, diff


def output_and_sensitivity(model: Callable[..., Any], x_t: Tensor, timesteps: Tensor, v: Tensor,
                           mode: str = DEFAULT_MODE, *, create_graph: bool = True,
                           fd_step: float = DEFAULT_FD_STEP, **model_kwargs: Any) -> tuple[Tensor, Tensor]:
    """The model's output at x_t and the per-sample sensitivity s = ||J v||^2 (or ||J^T v||^2),
    Tensor[B]: ``output_and_product`` with the product's squared norm."""
    out, u = output_and_product(model, x_t, timesteps, v, mode, create_graph=create_graph, fd_step=fd_step,
                                **model_kwargs)
    return out, squared_norm(u)


def jacobian_sensitivity(model: Callable[..., Any], x_t: Tensor, timesteps: Tensor, v: Tensor,
                         mode: Mode = DEFAULT_MODE, *, fd_step: float = DEFAULT_FD_STEP,
                         **model_kwargs: Any) -> Tensor:
    """Per-sample sensitivity, Tensor[B]: ||J v||^2 (jvp, fd) or ||J^T v||^2 (vjp).

    J = d model(x_t, t) / d x_t for each sample. Differentiable w.r.t. the model's parameters when
    grad mode is on (it is built for training the student); pass unit directions v as docs/method.md
    describes, e.g. from ``sample_directions(x_t)``. Handles diffusers' fused attention and
    GroupNorm internally and leaves the model as it found it.
    """
    create_graph = torch.is_grad_enabled()
    with jacobian_safe(model, math_attention=needs_math_attention(mode, create_graph)):
        _, s = output_and_sensitivity(model, x_t, timesteps, v, mode, create_graph=create_graph,
                                      fd_step=fd_step, **model_kwargs)
    return s


def second_match_loss(student: Callable[..., Any], teacher: Callable[..., Any], x_t: Tensor, timesteps: Tensor,
                      v: Tensor | None = None, mode: Mode = DEFAULT_MODE, *, fd_step: float = DEFAULT_FD_STEP,
                      generator: torch.Generator | None = None, form: TermForm = TermForm(),
                      scheduler: Any = None, **model_kwargs: Any) -> Tensor:
    """The 2ndMatch term, a scalar: by default the paper's, the batch mean of
    (||J_S v||^2 - sg(||J_T v||^2))^2; ``form`` (a :class:`TermForm`) gives the other forms of
    :func:`jacobian_term`, a timestep weighting on the ``scheduler``'s schedule and prediction type
    (the measured variant: ``form=TermForm(match="vector", weighting="noise", reference_dims=1)``).

    ``timesteps`` are what both networks are called with: the training ranks t that ``add_noise``
    takes, except under a flow-matching ``scheduler``, whose networks take sigma_t * T:
    ``model_timesteps(t, scheduler)``, as the strategies pass them (the weighting and
    ``form.min_timestep`` read them so too).

    The same v serves student and teacher; when not given it is drawn as one random unit direction
    per sample. The teacher is evaluated without a graph: it contributes a target only and its
    parameters never receive ``.grad``. The student gets the exact gradient of the estimate.
    """
    if v is None:
        v = sample_directions(x_t, generator)
    _, u_student, _, u_teacher = student_and_teacher_products(student, teacher, x_t, timesteps, v, mode,
                                                              fd_step=fd_step, **model_kwargs)
    return jacobian_term(u_student, u_teacher, timesteps, match=form.match, weighting=form.weighting,
                         scheduler=scheduler, prediction_type=prediction_of(scheduler), min_timestep=form.min_timestep,
                         reference_dims=form.reference_dims)


def student_and_teacher_products(student: Callable[..., Any], teacher: Callable[..., Any], x_t: Tensor,
                                 timesteps: Tensor, v: Tensor, mode: Mode, *, fd_step: float = DEFAULT_FD_STEP,
                                 **model_kwargs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(eps_S, u_S, eps_T, u_T): both models' outputs and Jacobian products (``output_and_product``)
    along the same v. The student's carry a graph; the teacher's are detached and its parameters
    never get ``.grad``."""
    with jacobian_safe(teacher, math_attention=needs_math_attention(mode, create_graph=False)):
        eps_t, u_t = output_and_product(teacher, x_t, timesteps, v, mode, create_graph=False,
                                        fd_step=fd_step, **model_kwargs)
    with jacobian_safe(student, math_attention=needs_math_attention(mode, create_graph=True)):
        eps_s, u_s = output_and_product(student, x_t, timesteps, v, mode, create_graph=True,
                                        fd_step=fd_step, **model_kwargs)
    return eps_s, u_s, eps_t, u_t


def student_and_teacher_sensitivity(student: Callable[..., Any], teacher: Callable[..., Any], x_t: Tensor,
                                    timesteps: Tensor, v: Tensor, mode: Mode, *, fd_step: float = DEFAULT_FD_STEP,
                                    **model_kwargs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(eps_S, s_S, eps_T, s_T): both models' outputs and sensitivities along the same v
    (``student_and_teacher_products`` with the products' squared norms)."""
    eps_s, u_s, eps_t, u_t = student_and_teacher_products(student, teacher, x_t, timesteps, v, mode,
                                                          fd_step=fd_step, **model_kwargs)
    return eps_s, squared_norm(u_s), eps_t, squared_norm(u_t)
