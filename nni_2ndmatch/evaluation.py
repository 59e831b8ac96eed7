"""Evaluation of a diffusion student against its teacher: deterministic DDIM sampling,
digits-FID, teacher fidelity and the Jacobian sensitivity profile.

digits-FID is the Frechet distance between the penultimate features (64-d) of the built-in digits
classifier for generated samples and for the held-out real digits: a domain-specific FID, like
FID with LeNet features on MNIST. It is not comparable to Inception FID.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .data import DigitsDataset
from .method import (
    default_scheduler,
    jacobian_sensitivity,
    model_output,
    sample_directions,
)
from .models.digits import RESOLUTION, load_digits_classifier


def ddim_scheduler(num_steps: int) -> Any:
    """Deterministic DDIM (eta=0) on the training schedule (linear betas 1e-4..0.02, 1000 steps)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              clip_sample=True, set_alpha_to_one=True)
    scheduler.set_timesteps(num_steps)
    return scheduler


@torch.no_grad()
def ddim_sample(model: Callable[..., Any], noise: Tensor, num_steps: int = 50, batch_size: int = 256,
                **conditioning: Tensor) -> Tensor:
    """Samples from ``noise`` [N, C, H, W] with ``num_steps`` DDIM steps; the same noise and model
    give the same samples. Conditioning tensors have N rows."""
    scheduler = ddim_scheduler(num_steps)
    outputs = []
    for start in range(0, noise.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        x = noise[rows].clone()
        cond = {k: v[rows] for k, v in conditioning.items()}
        for t in scheduler.timesteps:
            eps = model_output(model, x, torch.full((x.shape[0],), float(t), device=x.device), **cond)
            x = scheduler.step(eps, t, x).prev_sample
        outputs.append(x.clamp(-1.0, 1.0))
    return torch.cat(outputs)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, D] and b [M, D] (float64):
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(s_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * middle)


@torch.no_grad()
def digits_features(images: Tensor, classifier: torch.nn.Module | None = None) -> Tensor:

    classifier = classifier if classifier is not None else load_digits_classifier()
    return classifier.features(images.float().clamp(-1, 1))


def digits_fid(samples: Tensor, classifier: torch.nn.Module | None = None) -> float:
    """digits-FID of 1x8x8 samples in [-1, 1] against the held-out real digits (test split)."""
    reference = DigitsDataset(RESOLUTION, "test").images
    return frechet_distance(digits_features(samples, classifier), digits_features(reference, classifier))


def fidelity(student_samples: Tensor, teacher_samples: Tensor) -> float:
    """Root-mean-square difference per pixel (images in [-1, 1]) between the samples of two models
    from the same noise, averaged over samples: 0 = the student reproduces the teacher."""
    diff = (student_samples - teacher_samples).flatten(1)
    return float(diff.pow(2).mean(1).sqrt().mean())


def sensitivity_profile(model: Callable[..., Any], x0: Tensor, timesteps: list[int], seed: int = 0,
                        **conditioning: Tensor) -> list[float]:
    """Mean ||J v||^2 over x0's samples at each timestep (unit random v, exact jvp): how strongly
    the model amplifies a perturbation of its noisy input, the paper's FTLE-like diagnostic."""
    scheduler = default_scheduler()
    g = torch.Generator().manual_seed(seed)
    profile = []
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=g)
        steps = torch.full((x0.shape[0],), t)
        x_t = scheduler.add_noise(x0, noise, steps)
        v = sample_directions(x_t, generator=g)
        profile.append(float(jacobian_sensitivity(model, x_t, steps.float(), v, mode="jvp", **conditioning).mean()))
    return profile
