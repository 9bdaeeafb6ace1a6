"""Rectified-flow training quantities and the img2img Euler sampler used by Sat-JEPA-Diff.

Convention (the paper's, and diffusers' FlowMatchEulerDiscreteScheduler's): ``x_s = (1 - s) x0 + s eps`` for a
noise level ``s`` in [0, 1], velocity target ``v* = eps - x0``, so the clean sample is ``x0 = x_s - s v``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]


def broadcast(sigmas: Tensor, like: Tensor) -> Tensor:
    return sigmas.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(clean: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """``x_s = (1 - s) x0 + s eps`` per sample."""
    sigmas = broadcast(sigmas, clean)
    return (1 - sigmas) * clean + sigmas * noise


def velocity_target(clean: Tensor, noise: Tensor) -> Tensor:
    """``v* = eps - x0``."""
    return noise - clean


def clean_estimate(noisy: Tensor, velocity: Tensor, sigmas: Tensor) -> Tensor:
    """``x0_hat = x_s - s v``: differentiable in ``velocity`` (this is what the SSIM term trains through)."""
    return noisy - broadcast(sigmas, noisy) * velocity


class FlowMatching:
    """Noise-level sampling for training and the img2img Euler sampler for inference.

    Args:
        sigma_sampling: ``"uniform"`` (the paper: s ~ U(0, 1)) or ``"logit_normal"`` (SD3's s = sigmoid(N(m, sd))).
        logit_mean, logit_std: parameters of the logit-normal option.
        strength: noise level the conditioning latent is pushed to before sampling (paper: 0.35).
        num_steps: Euler steps from ``strength`` down to 0; the transformer is called exactly ``num_steps``
            times (every step is a real step of a ``num_steps``-point schedule over [strength, 0)).
        shift: the scheduler's timestep shift applied to that schedule (1.0 = none, matching uniform training;
            with shift > 1 the first noise level becomes ``shift * strength / (1 + (shift - 1) * strength)``).
    """

    def __init__(
        self,
        sigma_sampling: Literal["uniform", "logit_normal"] = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        strength: float = 0.35,
        num_steps: int = 20,
        shift: float = 1.0,
    ):
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"config key 'strength' must be in (0, 1], got {strength}")
        if num_steps < 1:
            raise ValueError(f"config key 'num_steps' must be >= 1, got {num_steps}")
        self.sigma_sampling = sigma_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.strength = strength
        self.num_steps = num_steps
        self.shift = shift

    def sample_sigmas(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """Training noise levels ``(B,)`` in [0, 1] (continuous, as the paper's ``sigma``)."""
        return compute_density_for_timestep_sampling(
            self.sigma_sampling,
            batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            device=device,
            generator=generator,
        )

    def scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        """A fresh scheduler holding the sampling schedule (schedulers keep a step index, so one per call)."""
        scheduler = FlowMatchEulerDiscreteScheduler(shift=self.shift)
        sigmas = np.linspace(self.strength, 0.0, self.num_steps + 1)[:-1]
        scheduler.set_timesteps(sigmas=sigmas.tolist())
        return scheduler

    @torch.no_grad()
    def img2img(self, velocity_fn: VelocityFn, start: Tensor, noise: Tensor) -> Tensor:
        """Noise ``start`` latents with ``noise`` to the first schedule level, then integrate ``num_steps`` Euler
        steps to 0.

        ``velocity_fn(latents, sigmas)`` predicts the velocity at per-sample noise levels ``sigmas`` ``(B,)``.
        The caller draws ``noise`` (same shape as ``start``), so it decides how each sample's noise is seeded.
        """
        if noise.shape != start.shape:
            raise ValueError(f"img2img: noise {tuple(noise.shape)} and latents {tuple(start.shape)} differ")
        scheduler = self.scheduler()
        noise = noise.to(device=start.device, dtype=torch.float32)
        latents = scheduler.scale_noise(start.float(), scheduler.timesteps[:1].to(start.device), noise)
        for timestep in scheduler.timesteps:
            sigmas = (timestep / scheduler.config.num_train_timesteps).expand(start.shape[0]).to(start.device)
            velocity = velocity_fn(latents, sigmas)
            latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0]
        return latents
