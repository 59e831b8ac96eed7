"""Finetuning strategies for pruned diffusion students, chosen by name from one registry.

    ft = get_finetuner("2ndmatch", lambda_jac=0.1, mode="vjp")
    loss, terms = ft.loss(student, teacher, x0, noise, timesteps, **model_kwargs)

Built in: ``dsm`` (noise prediction only), ``kd`` (dsm + output distillation) and ``2ndmatch``
(dsm + kd + second-order Jacobian matching). Other packages add strategies through the entry-point
group ``nni_2ndmatch.finetuners`` (each entry point loads a Finetuner subclass).
"""

from __future__ import annotations

import inspect
import logging
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from torch import Tensor, nn

from .method import (
    DEFAULT_FD_STEP,
    FLOW,
    JAC_MATCHES,
    JAC_WEIGHTINGS,
    MODES,
    PREDICTION_TYPES,
    add_noise,
    default_scheduler,
    dsm_term,
    jacobian_safe,
    jacobian_term,
    jacobian_weight,
    kd_term,
    model_output,
    model_timesteps,
    noise_scale,
    output_and_sensitivity,
    prediction_of,
    require_scheduler,
    sample_directions,
    student_and_teacher_products,
)
from .scoped import seeded_generator
from .utils import did_you_mean, validation_errors

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "nni_2ndmatch.finetuners"

_REGISTRY: dict[str, type["Finetuner"]] = {}
_entry_points_loaded = False


def register_finetuner(name: str) -> Callable[[type["Finetuner"]], type["Finetuner"]]:
    """Class decorator: register a Finetuner subclass under ``name`` (a duplicate is an error)."""

    def decorate(cls: type[Finetuner]) -> type[Finetuner]:
        params = inspect.signature(cls.__init__).parameters
        undeclared = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY
                      and p not in ("scheduler", "options") and p not in cls.Options.model_fields]
        if undeclared:
            raise TypeError(f"{cls.__qualname__}: {', '.join(undeclared)} are keyword arguments of __init__ but not "
                            "fields of its Options model, so they would be neither validated nor recorded; declare "
                            "them in a FinetunerOptions subclass set as Options (docs/development.md: adding a "
                            "strategy)")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"finetuner {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Finetuner)):
            raise TypeError(f"entry point {ep.name!r} in group {ENTRY_POINT_GROUP!r} is not a Finetuner subclass")
        register_finetuner(ep.name)(cls)


def available_finetuners() -> list[str]:
    """Names of every registered strategy, built-in and from entry points, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def finetuner_class(name: str) -> type["Finetuner"]:
    names = available_finetuners()
    if name not in _REGISTRY:
        raise ValueError(f"finetuner={name!r} is unknown; available: {', '.join(names)}")
    return _REGISTRY[name]


def finetuner_options(name: str) -> list[str]:
    """The options a strategy accepts: the fields of its ``Options`` model."""
    return list(finetuner_class(name).Options.model_fields)


def get_finetuner(name: str, **options: Any) -> "Finetuner":
    """Build the strategy ``name`` with its options; unknown names or options list what is allowed."""
    return finetuner_class(name)(**options)


class FinetunerOptions(BaseModel):
    """The options every strategy has. Subclasses add theirs; strict types (a bool is no number, a
    string no integer), unknown keys are errors, and ``model_dump()`` round-trips."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    lambda_dsm: float = Field(1.0, ge=0, allow_inf_nan=False, description="weight of ||eps_S - eps||^2")

    @model_validator(mode="after")
    def _some_weight(self) -> "FinetunerOptions":
        weights = [k for k in type(self).model_fields if k.startswith("lambda_")]
        if weights and not any(getattr(self, k) for k in weights):
            raise ValueError(f"every loss weight is 0 ({', '.join(weights)}): the loss would be zero and the student "
                             "would not change; allowed: at least one weight > 0")
        return self


def option_problems(name: str, options_model: type[FinetunerOptions], options: dict[str, Any],
                    section: str | None = None, section_keys: Iterable[str] = ()) -> tuple[FinetunerOptions | None,
                                                                                       list[str]]:
    """The strategy's typed options and, when they do not validate, one line per bad option naming
    it, its value and what is allowed: ``key=value ...`` for the Python API, ``section.key: value
    ...`` for a config file's section (``section``, e.g. "finetune", whose own ``section_keys``
    are allowed too)."""
    try:
        return options_model(**options), []
    except ValidationError as e:
        allowed = list(options_model.model_fields)
        if section is not None:
            allowed = sorted({*allowed, *section_keys})
        problems = []
        for key, kind, value, message in validation_errors(e):
            where = f"{section}.{key}: " if section is not None else ""
            if key is None:
                problems.append(f"{section}: {message}" if section is not None else message)
            elif kind == "extra_forbidden":
                what = f"unknown key for finetuner {name!r}" if section is not None else \
                    f"finetuner {name!r} has no option {key!r}"
                problems.append(f"{where}{what}{did_you_mean(key, allowed)} (allowed: {', '.join(allowed)})")
            else:
                problems.append(f"{where}value {value!r} is not allowed: {message}" if section is not None
                                else f"{key}={value!r} is not allowed: {message}")
        return None, problems


def validate_options(name: str, options_model: type[FinetunerOptions], options: dict[str, Any]) -> FinetunerOptions:
    """The strategy's typed options, or one ValueError naming each bad option, its value and what is allowed."""
    opts, problems = option_problems(name, options_model, options)
    if problems:
        raise ValueError("; ".join(problems))
    return opts


def _split_kwargs(kwargs: dict[str, Any], batch: int, index: slice, repeats: int = 1) -> dict[str, Any]:
    """Slice the per-sample conditioning tensors (first dim == batch) and repeat them."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
            value = value[index]
            if repeats > 1:
                value = value.repeat(repeats, *([1] * (value.dim() - 1)))
        out[key] = value
    return out


class Finetuner:
    """A finetuning strategy: one step's loss for a student given a frozen teacher.

    Subclasses implement ``terms`` and ``weights`` and declare their options as a pydantic model
    ``Options`` (a subclass of ``FinetunerOptions``), validated once here; each option is also an
    attribute (``ft.lambda_jac``). ``loss`` noises x0 with the scheduler and weighs the terms.
    """

    name: ClassVar[str] = ""
    uses_teacher: ClassVar[bool] = True
    Options: ClassVar[type[FinetunerOptions]] = FinetunerOptions
    #: The optimisation step (0-based) the next ``loss`` belongs to, for options that act on some
    #: steps only (2ndmatch's ``jac_every``); ``finetune`` and the NNI distiller set it each step.
    step: int | None = None

    def __init__(self, *, scheduler: Any = None, options: FinetunerOptions | None = None, **kwargs: Any) -> None:
        if options is not None:  # already validated (a config section's): taken as it is
            if kwargs or not isinstance(options, self.Options):
                raise TypeError(f"options: give a {self.Options.__name__} alone, or the options as keywords")
            self.opts = options
        else:
            self.opts = validate_options(self.name or type(self).__name__, self.Options, kwargs)
        for key, value in self.opts:
            setattr(self, key, value)
        self.scheduler = scheduler if scheduler is not None else default_scheduler()
        require_scheduler(self.scheduler)
        self.prediction_type = prediction_of(self.scheduler)
        if self.prediction_type not in (*PREDICTION_TYPES, FLOW):
            raise ValueError(f"scheduler prediction_type={self.prediction_type!r} is not supported; allowed: "
                             + ", ".join(map(repr, PREDICTION_TYPES)))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def options(self) -> dict[str, Any]:
        """The strategy's options as plain values (for configs and reports); they round-trip."""
        return self.opts.model_dump()

    def weights(self) -> dict[str, float]:
        return {"dsm": self.lambda_dsm}

    def resolve(self, teacher: Callable[..., Any] | None, sample_shape: tuple[int, ...]) -> None:
        """Fix, before training, any option that is chosen from the teacher and the data's sample
        shape (the finetuning loop calls it once; nothing here)."""

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return add_noise(x0, noise, timesteps, self.scheduler)

    def loss(self, student: Callable[..., Any], teacher: Callable[..., Any] | None, x0: Tensor, noise: Tensor,
             timesteps: Tensor, **model_kwargs: Any) -> tuple[Tensor, dict[str, float]]:
        """Total loss of one step and its terms as detached floats (``loss`` included). The terms get
        the network's regression target: ``noise`` (epsilon prediction), under the scheduler's
        ``v_prediction`` the velocity sqrt(abar_t) noise - sqrt(1 - abar_t) x0, under flow matching
        the velocity noise - x0; and the network's timesteps (``model_timesteps``)."""
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x0.shape[0])
        x_t = self.add_noise(x0, noise, timesteps)
        if self.prediction_type == FLOW:
            target = noise - x0
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, timesteps.to(x0.device))
        else:
            target = noise
        terms = self.terms(student, teacher, x_t, target, model_timesteps(timesteps, self.scheduler), **model_kwargs)
        weights = self.weights()
        total = sum((w * terms[k] for k, w in weights.items() if k in terms), torch.zeros((), device=x0.device))
        logged = {k: float(v.detach()) for k, v in terms.items()}
        logged["loss"] = float(total.detach())
        return total, logged

    def terms(self, student, teacher, x_t: Tensor, target: Tensor, timesteps: Tensor,
              **model_kwargs: Any) -> dict[str, Tensor]:
        """The unweighted terms of one step; ``target`` is what the network should output (``loss``)."""
        raise NotImplementedError


@register_finetuner("dsm")
class DSM(Finetuner):
    """Denoising score matching: lambda_dsm * ||eps_S - eps||^2 (sum over pixels, mean over batch;
    under v_prediction the target is the velocity)."""

    uses_teacher = False

    def terms(self, student, teacher, x_t, target, timesteps, **model_kwargs):
        return {"dsm": dsm_term(model_output(student, x_t, timesteps, **model_kwargs), target)}


class TeacherOptions(FinetunerOptions):
    lambda_kd: float = Field(1.0, ge=0, allow_inf_nan=False, description="weight of ||eps_S - sg(eps_T)||^2")


class KDOptions(TeacherOptions):
    kd_perturb: Literal["none", "noise"] = Field("none", description="none: the kd term at x_t; noise: at x_t +/- "
                                                 "s_t g instead (g ~ N(0, I), s_t = sqrt(1 - abar_t))")


class SecondMatchOptions(TeacherOptions):
    lambda_jac: float = Field(0.1, ge=0, allow_inf_nan=False, description="weight of the 2ndMatch term")
    mode: Literal[("auto", *MODES)] = Field("auto", description="Jacobian estimator: auto (chosen from the "  # type: ignore[valid-type]
                                           "teacher: fd where attention dominates and fd is accurate there, "
                                           "else vjp), vjp, jvp or fd")
    num_projections: int = Field(1, ge=1, description="directions v per sample")
    jac_fraction: float = Field(1.0, gt=0, le=1, description="share of the batch that gets the Jacobian term")
    fd_step: float = Field(DEFAULT_FD_STEP, gt=0, lt=1, description="step of the central difference (mode fd)")
    jac_weighting: Literal[JAC_WEIGHTINGS] = Field(  # type: ignore[valid-type]
        "none", description="a timestep scale c(t) on both Jacobians: none, noise (sqrt(1 - abar_t)) or x0 "
        "(the predicted clean image's)")
    jac_reference_dims: int | None = Field(None, ge=1, description="image size C*H*W at which lambda_jac is "
                                           "balanced (3072: the paper's 32x32x3); null: the raw term")
    jac_match: Literal[JAC_MATCHES] = Field("norm", description="norm (the paper), vector or log")
    jac_min_timestep: int = Field(0, ge=0, description="samples with t below it get no Jacobian term")
    jac_every: int = Field(1, ge=1, description="the Jacobian term on every k-th step only, weighted k (the same "
                           "expected contribution per step); the steps between cost what a kd step costs")

    @field_validator("lambda_jac")
    @classmethod
    def _jac_weighs_something(cls, value: float) -> float:
        if value == 0:
            raise ValueError("the Jacobian term would still be computed every step, at full cost, and weigh nothing; "
                             "allowed: lambda_jac > 0, or finetuner kd (the same loss without the term)")
        return value

    @field_validator("fd_step")
    @classmethod
    def _fd_step_needs_fd(cls, value: float, info: ValidationInfo) -> float:
        mode = info.data.get("mode")
        if mode in ("vjp", "jvp") and value != DEFAULT_FD_STEP:
            raise ValueError(f"it is the step of mode fd (and of auto where auto takes fd), not of mode {mode!r}; "
                             "leave it out or use mode fd or auto")
        return value

    @model_validator(mode="after")
    def _weighting_changes_the_term(self) -> "SecondMatchOptions":
        if self.jac_match == "log" and self.jac_weighting != "none":
            raise ValueError(f"jac_weighting={self.jac_weighting!r} is not allowed with jac_match='log' (a "
                             "per-sample scale cancels in a log ratio); allowed: none")
        return self


def jac_every_refusal(jac_every: int, steps: int) -> str | None:
    """Why ``jac_every`` is refused in a run of ``steps`` steps, or None."""
    if jac_every > steps:
        return f"with steps {steps}: the Jacobian term would never be computed; allowed: 1 to {steps}"
    return None


def schedule_refusal(finetuner: "Finetuner") -> str | None:
    """Why the strategy's ``jac_min_timestep`` is refused on its scheduler, or None."""
    floor, steps = getattr(finetuner.opts, "jac_min_timestep", 0), int(finetuner.scheduler.config.num_train_timesteps)
    if floor >= steps:
        return (f"the teacher's schedule has timesteps below {steps}, so no sample would get the Jacobian term; "
                f"allowed: 0 to {steps - 1}")
    return None


def kd_terms(student, teacher, x_t: Tensor, target: Tensor, timesteps: Tensor,
             **model_kwargs: Any) -> dict[str, Tensor]:
    """The dsm and kd terms at x_t: one teacher forward (no graph) and one student forward."""
    with torch.no_grad():
        eps_t = model_output(teacher, x_t, timesteps, **model_kwargs)
    eps_s = model_output(student, x_t, timesteps, **model_kwargs)
    return {"dsm": dsm_term(eps_s, target), "kd": kd_term(eps_s, eps_t)}


@register_finetuner("kd")
class KD(Finetuner):
    """DSM plus output distillation: lambda_kd * ||eps_S - sg(eps_T)||^2.

    Options:
      kd_perturb: ``none`` (the kd term at x_t) or ``noise``: the kd term at the antithetic pair
        x_t +/- s_t g instead, averaged (g ~ N(0, I) drawn per sample and step, s_t = sqrt(1 -
        abar_t), the sample's own noise scale); the dsm term stays at x_t. Since the first-order
        parts of the pair cancel, its expectation over g is, to second order in s_t, kd at x_t plus
        (1 - abar_t) ||J_S - J_T||_F^2: what 2ndmatch's ``jac_match: vector, jac_weighting: noise,
        jac_reference_dims: 1`` adds at lambda_jac 1, with no double backward (3 student and 2
        teacher passes per sample). The control for that variant.
    """

    Options = KDOptions

    def weights(self):
        return {"dsm": self.lambda_dsm, "kd": self.lambda_kd}

    def terms(self, student, teacher, x_t, target, timesteps, **model_kwargs):
        if self.kd_perturb == "none":
            return kd_terms(student, teacher, x_t, target, timesteps, **model_kwargs)
        batch = x_t.shape[0]
        scale = noise_scale(timesteps, self.scheduler).to(x_t.device, x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        step = scale * torch.randn_like(x_t)
        x_pair, t_pair = torch.cat([x_t + step, x_t - step]), timesteps.repeat(2)
        with torch.no_grad():
            eps_t = model_output(teacher, x_pair, t_pair, **_split_kwargs(model_kwargs, batch, slice(None), 2))
        eps_s = model_output(student, torch.cat([x_t, x_pair]), timesteps.repeat(3),
                             **_split_kwargs(model_kwargs, batch, slice(None), 3))
        return {"dsm": dsm_term(eps_s[:batch], target), "kd": kd_term(eps_s[batch:], eps_t)}  # mean over the pair


@register_finetuner("2ndmatch")
class SecondMatch(KD):
    """DSM + KD + lambda_jac * (||J_S v||^2 - sg(||J_T v||^2))^2 (arXiv 2506.05398).

    Options:
      mode: Jacobian estimator, ``vjp`` (exact; the cheapest on convolutional U-Nets and DiTs),
        ``jvp`` (exact, the paper's forward-mode form), ``fd`` (central finite difference, step
        ``fd_step``; the cheapest where attention dominates) or ``auto`` (the default: ``resolve``
        picks ``fd`` or ``vjp`` from the teacher by :func:`choose_mode`).
      num_projections: directions v per sample (the term is averaged over them).
      jac_fraction: share of the batch that gets the Jacobian term (the first ceil(f*B) samples;
        the batch is random, so this is a random subset). The rest use the fast ordinary path.
      jac_match: how the Jacobian products u = J v (or J^T v) of student and teacher are compared:
        ``norm`` (the paper: (||u_S||^2 - ||u_T||^2)^2, one number per sample), ``vector``
        (||u_S - u_T||^2, Jacobian matching) or ``log`` ((log ||u_S||^2 - log ||u_T||^2)^2,
        relative, the same scale at every t). Same cost for all three.
      jac_weighting: a per-timestep scale c(t) on both Jacobians before they are compared:
        ``none`` (the paper); ``noise``: c = sqrt(1 - abar_t), the Jacobian of the noise
        component of x_t (near t = 0, ||J v||^2 grows like 1/(1 - abar_t) and dominates the
        unweighted term); ``x0``: the Jacobian of the predicted clean image, whose difference
        between student and teacher is c = sqrt((1 - abar_t) / abar_t) times theirs under epsilon
        prediction (sqrt(1 - abar_t) under v_prediction): the scale at which an error reaches the
        sampler's image estimate. A ``norm`` term scales by c^4, a ``vector`` term by c^2; it
        changes the term's size: retune lambda_jac.
      jac_min_timestep: samples with t below it contribute no Jacobian term (their DSM and KD
        terms stay); the term is still averaged over the whole Jacobian batch. Under flow
        matching t is the network's timestep sigma * T, not the training rank.
      jac_every: the Jacobian term on every k-th optimisation step only (steps k, 2k, ... counted
        from 1, read from ``step``), multiplied by k so that its expected contribution per step is
        the every-step term's; the steps between are kd steps, and log no ``jac``. A function of the
        step alone, so a resumed run does what an uninterrupted one does.
    The outputs of the Jacobian evaluations serve the DSM and KD terms: no extra forward passes.
    """

    Options = SecondMatchOptions

    def weights(self):
        return {"dsm": self.lambda_dsm, "kd": self.lambda_kd, "jac": self.lambda_jac}

    def resolve(self, teacher: Callable[..., Any], sample_shape: tuple[int, ...]) -> None:
        """``mode: auto`` becomes the estimator :func:`choose_mode` picks from the teacher (logged;
        ``options()`` then records it); other modes stay as they are."""
        if self.mode != "auto":
            return
        self.mode, reason = choose_mode(teacher, sample_shape, fd_step=self.fd_step)
        self.opts = self.opts.model_copy(update={"mode": self.mode})
        logger.info("2ndmatch mode auto: %s (%s)", self.mode, reason)

    def jacobian_step(self) -> bool:
        """Whether the step ``step`` computes the Jacobian term (``jac_every``)."""
        if self.jac_every == 1:
            return True
        if self.step is None:
            raise ValueError(f"jac_every={self.jac_every} needs the optimisation step: set the finetuner's step "
                             "before each loss (finetune() and SecondMatchDistiller do)")
        return (self.step + 1) % self.jac_every == 0

    def terms(self, student, teacher, x_t, target, timesteps, **model_kwargs):
        self.resolve(teacher, tuple(x_t.shape[1:]))
        if not self.jacobian_step():
            return kd_terms(student, teacher, x_t, target, timesteps, **model_kwargs)
        batch = x_t.shape[0]
        k = max(1, min(batch, int(-(-self.jac_fraction * batch // 1))))  # ceil, at least one sample
        p = self.num_projections
        jac, rest = slice(0, k), slice(k, batch)

        x_j = x_t[jac].repeat(p, *([1] * (x_t.dim() - 1)))
        t_j = timesteps[jac].repeat(p)
        kw_j = _split_kwargs(model_kwargs, batch, jac, p)
        eps_s_j, u_s, eps_t_j, u_t = student_and_teacher_products(
            student, teacher, x_j, t_j, sample_directions(x_j), self.mode, fd_step=self.fd_step, **kw_j)
        eps_s, eps_t = eps_s_j[:k], eps_t_j[:k]
        if k < batch:
            kw_r = _split_kwargs(model_kwargs, batch, rest)
            with torch.no_grad():
                eps_t_r = model_output(teacher, x_t[rest], timesteps[rest], **kw_r)
            eps_s_r = model_output(student, x_t[rest], timesteps[rest], **kw_r)
            eps_s, eps_t = torch.cat([eps_s, eps_s_r]), torch.cat([eps_t, eps_t_r])
        jac = jacobian_term(u_s, u_t, t_j, match=self.jac_match, weighting=self.jac_weighting,
                            scheduler=self.scheduler, prediction_type=self.prediction_type,
                            min_timestep=self.jac_min_timestep, reference_dims=self.jac_reference_dims)
        return {"dsm": dsm_term(eps_s, target), "kd": kd_term(eps_s, eps_t), "jac": jac * self.jac_every}

    def jacobian_scale(self, timesteps: Tensor) -> Tensor:
        """c(t) of ``jac_weighting`` per sample (float64), the factor on both Jacobians."""
        return jacobian_weight(timesteps, self.jac_weighting, self.scheduler, self.prediction_type)


#: ``mode: auto`` takes ``fd`` where a forward pass has at least this many attention-score entries
#: per multiply-add: between the DiT-S/2 layout (7.8e-4, where ``vjp`` is the cheaper step) and the
#: attention-heavy U-Net (5.9e-3, where ``fd`` is), measured in docs/performance.md.
FD_SCORES_PER_MAC = 2e-3
#: ... and where the difference stays within this relative error of the exact product (jvp).
FD_MAX_ERROR = 1e-3


def choose_mode(model: Callable[..., Any], sample_shape: tuple[int, ...], *, fd_step: float = DEFAULT_FD_STEP,
                probes: int = 4) -> tuple[str, str]:
    """(estimator, why) for a model shaped like ``model`` on samples of ``sample_shape``: ``fd``
    where its attention dominates the forward pass (at least :data:`FD_SCORES_PER_MAC` score
    entries per multiply-add: there the second derivatives of softmax make ``vjp``'s double
    backward the slowest part) and the central difference stays within :data:`FD_MAX_ERROR` of
    the exact ``jvp`` on ``probes`` seeded inputs across the timesteps; ``vjp`` otherwise."""
    from .models import example_conditioning
    from .models.profile import forward_profile

    device = next((p.device for p in model.parameters()), torch.device("cpu")) if isinstance(model, nn.Module) \
        else torch.device("cpu")
    g = seeded_generator(0)
    x = torch.randn(probes, *sample_shape, generator=g).to(device)
    t = torch.linspace(10, 900, probes).round().to(device)
    cond = {k: v.to(device) for k, v in example_conditioning(model, probes).items()} \
        if isinstance(model, nn.Module) else {}
    profile = forward_profile(model, x[:1], t[:1], **{k: v[:1] for k, v in cond.items()})
    density = profile.scores_per_mac
    if density < FD_SCORES_PER_MAC:
        return "vjp", f"{density:.2g} attention scores per multiply-add, below {FD_SCORES_PER_MAC:g}"
    v = sample_directions(torch.empty(probes, *sample_shape), g).to(device)
    with torch.no_grad(), jacobian_safe(model):
        _, exact = output_and_sensitivity(model, x, t, v, "jvp", create_graph=False, **cond)
        _, approx = output_and_sensitivity(model, x, t, v, "fd", create_graph=False, fd_step=fd_step, **cond)
    error = float(((approx - exact).abs() / exact.abs().clamp_min(1e-30)).max())
    if error > FD_MAX_ERROR:
        return "vjp", f"{density:.2g} attention scores per multiply-add, but fd's error {error:.2g} > {FD_MAX_ERROR:g}"
    return "fd", f"{density:.2g} attention scores per multiply-add (>= {FD_SCORES_PER_MAC:g}), fd's error {error:.2g}"
