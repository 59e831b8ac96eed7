"""The noise schedule of training: the reference DDPM schedule, noising, and timestep draws; and
flow matching (``FlowMatchEulerDiscreteScheduler``, SD3's and Flux's): x_t = (1 - sigma) x0 + sigma e,
the network predicting the velocity e - x0 and taking sigma * T as its timestep.

A training timestep is an index t in 0..T-1, noise growing with t. Under flow matching its sigma
is the scheduler's own training sigma of that rank (its ``shift`` applied), and the network is
called with sigma * T (:func:`model_timesteps`), as diffusers' training scripts do.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

#: The scheduler prediction types the finetuning trains (the DSM target: the noise, or the velocity).
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: The prediction of a flow-matching network (the velocity e - x0), implied by its scheduler.
FLOW = "flow"


def is_flow_matching(scheduler: Any) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


def prediction_of(scheduler: Any) -> str:
    """What the network predicts under ``scheduler``: its config's ``prediction_type`` (default
    epsilon), or under flow matching :data:`FLOW`."""
    if is_flow_matching(scheduler):
        return FLOW
    return getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")


def require_scheduler(scheduler: Any) -> None:
    """A ValueError unless ``scheduler`` is a diffusers noise scheduler (what the terms read of it)."""
    if not ((callable(getattr(scheduler, "add_noise", None)) or is_flow_matching(scheduler))
            and hasattr(getattr(scheduler, "config", None), "num_train_timesteps")):
        given = repr(scheduler) if isinstance(scheduler, (str, int, float)) else type(scheduler).__name__
        raise ValueError(f"scheduler={given} is not a diffusers noise scheduler (it needs add_noise, or flow "
                         "matching, and config.num_train_timesteps); allowed: e.g. DDPMScheduler(), or None for the "
                         "reference one")


def require_epsilon(scheduler: Any, what: str) -> None:
    """Raise a ValueError unless the network predicts the noise under ``scheduler``; ``what`` names
    what needs it, and why."""
    prediction = prediction_of(scheduler)
    if prediction != "epsilon":
        raise ValueError(f"{what}; the scheduler's prediction_type is {prediction!r}; allowed: 'epsilon'")


_SIGMAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # scheduler -> its flow_sigmas


def flow_sigmas(scheduler: Any) -> Tensor:
    """sigma of each training timestep t = 0..T-1 (ascending; float64): the training sigmas of a
    fresh scheduler of the same config (``set_timesteps`` for sampling replaces the scheduler's own)."""
    if scheduler not in _SIGMAS:
        fresh = type(scheduler).from_config(scheduler.config)
        _SIGMAS[scheduler] = fresh.sigmas.double().flip(0)[:int(fresh.config.num_train_timesteps)].cpu()
    return _SIGMAS[scheduler]


def model_timesteps(timesteps: Tensor, scheduler: Any = None) -> Tensor:
    """What the network takes as its timestep for training timesteps t: t itself, or under flow
    matching sigma_t * T (float32)."""
    if scheduler is None or not is_flow_matching(scheduler):
        return timesteps
    sigma = flow_sigmas(scheduler)[timesteps.long().cpu()]
    return (sigma * scheduler.config.num_train_timesteps).float().to(timesteps.device)


def own_schedule(config: Any) -> bool:
    """Whether a scheduler config's training schedule (steps, betas, prediction type) differs from
    the reference DDPM schedule in an entry it gives."""
    default = default_scheduler().config
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "trained_betas")
    return any(k in config and config[k] != default[k] for k in keys)


def default_scheduler() -> Any:
    """The DDPM noise schedule of the reference setting: 1000 steps, linear betas 1e-4..0.02."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def add_noise(x0: Tensor, noise: Tensor, timesteps: Tensor, scheduler: Any = None) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise under ``scheduler`` (default: ``default_scheduler()``);
    under flow matching x_t = (1 - sigma_t) x0 + sigma_t noise."""
    scheduler = scheduler if scheduler is not None else default_scheduler()
    if is_flow_matching(scheduler):
        sigma = flow_sigmas(scheduler)[timesteps.long().cpu()].to(x0.device, x0.dtype)
        sigma = sigma.view(-1, *([1] * (x0.dim() - 1)))
        return (1.0 - sigma) * x0 + sigma * noise
    return scheduler.add_noise(x0, noise, timesteps.to(x0.device))


#: How training timesteps are drawn: uniformly over the T ranks, or logit-normal (SD3's training).
TIMESTEP_DENSITIES = ("uniform", "logit_normal")


def sample_timesteps(batch: int, num_train_timesteps: int, antithetic: bool,
                     generator: torch.Generator | None = None, density: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0) -> Tensor:
    """``batch`` training timesteps in 0..T-1, uniform; ``antithetic``: in pairs t, T-1-t.

    ``density="logit_normal"``: u = sigmoid(logit_mean + logit_std z), z standard normal (pairs z,
    -z when antithetic), and t = T-1-floor(u T), so that a flow-matching scheduler's sigma of t is
    its training timesteps[floor(u T)] / T, the index diffusers' SD3 training scripts draw."""
    if density == "logit_normal":
        z = torch.randn((batch + 1) // 2 if antithetic else batch, generator=generator, dtype=torch.float64)
        z = torch.cat([z, -z])[:batch] if antithetic else z
        u = torch.sigmoid(logit_mean + logit_std * z)
        return (num_train_timesteps - 1 - (u * num_train_timesteps).long()).clamp(0, num_train_timesteps - 1)
    if density != "uniform":
        raise ValueError(f"density={density!r}; allowed: {', '.join(TIMESTEP_DENSITIES)}")
    if not antithetic:
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    t = torch.randint(0, num_train_timesteps, ((batch + 1) // 2,), generator=generator)
    return torch.cat([t, num_train_timesteps - 1 - t])[:batch]


def noise_scale(timesteps: Tensor, scheduler: Any = None) -> Tensor:
    """s_t = sqrt(1 - abar_t) per sample (float64, on the CPU): the standard deviation of the noise in
    x_t. Under flow matching ``timesteps`` are the network's (sigma * T, :func:`model_timesteps`)
    and s_t = sigma."""
    scheduler = scheduler if scheduler is not None else default_scheduler()
    if is_flow_matching(scheduler):
        return timesteps.double().cpu() / float(scheduler.config.num_train_timesteps)
    return (1.0 - scheduler.alphas_cumprod.double()[timesteps.long().cpu()]).sqrt()
