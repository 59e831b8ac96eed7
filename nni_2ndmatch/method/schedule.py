"""The noise schedule of training: the reference DDPM schedule, noising, and timestep draws.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: The scheduler prediction types the finetuning trains (the DSM target: the noise, or the velocity).
PREDICTION_TYPES = ("epsilon", "v_prediction")


def default_scheduler() -> Any:
    """The DDPM noise schedule of the reference setting: 1000 steps, linear betas 1e-4..0.02."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def add_noise(x0: Tensor, noise: Tensor, timesteps: Tensor, scheduler: Any = None) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise under ``scheduler`` (default: ``default_scheduler()``)."""
    scheduler = scheduler if scheduler is not None else default_scheduler()
    return scheduler.add_noise(x0, noise, timesteps.to(x0.device))


def sample_timesteps(batch: int, num_train_timesteps: int, antithetic: bool,
                     generator: torch.Generator | None = None) -> Tensor:
    """``batch`` training timesteps, uniform on 0..T-1; ``antithetic``: in pairs t, T-1-t."""
    if not antithetic:
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    t = torch.randint(0, num_train_timesteps, ((batch + 1) // 2,), generator=generator)
    return torch.cat([t, num_train_timesteps - 1 - t])[:batch]


def noise_scale(timesteps: Tensor, scheduler: Any = None) -> Tensor:
    """s_t = sqrt(1 - abar_t) per sample (float64, on the CPU): the standard deviation of the noise in x_t."""
    scheduler = scheduler if scheduler is not None else default_scheduler()
    return (1.0 - scheduler.alphas_cumprod.double()[timesteps.long().cpu()]).sqrt()
