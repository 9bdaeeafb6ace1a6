"""MCVD: masked conditional video diffusion (Voleti, Jolicoeur-Martineau and Pal, NeurIPS 2022), as a next-frame
forecaster.

Written from the paper: a DDPM whose UNet predicts the noise (epsilon) of the next frame given the past frames
concatenated on the channels ("concat" conditioning). During training the past frames are masked (set to zero)
with probability ``p_mask``, so one model learns both prediction (past given) and unconditional generation (past
masked). Frames are scaled from reflectance [0, 1] to [-1, 1] for the diffusion and back after sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import Tensor, nn

SAMPLERS = ("ddpm", "ddim")


def to_diffusion_range(frames: Tensor) -> Tensor:
    """Reflectance in [0, 1] to the diffusion's [-1, 1]; NaN/Inf (nodata) become 0 reflectance first."""
    return torch.nan_to_num(frames, nan=0.0, posinf=0.0, neginf=0.0).clamp(0.0, 1.0) * 2.0 - 1.0


class MCVD(nn.Module):
    """Conditional DDPM denoiser ``eps(x_t, t, past)`` with the paper's conditioning masking and DDPM/DDIM sampling.

    Defaults follow the paper's code for 128 px frames (its Cityscapes ``unetmore`` DDPM configuration): 1000
    training timesteps, a linear beta schedule from 1e-4 to 0.02, epsilon prediction, ``p_mask`` 0.5 (the
    prediction-and-generation models), DDPM sampling on 100 evenly spaced timesteps with the predicted clean frame
    clipped to [-1, 1] at every step; UNet widths 128 x (1, 1, 2, 3, 4), 2 residual blocks per level, attention at
    the 32, 16 and 8 px levels with 128 channels per head, no dropout. Differences from the paper's UNet: diffusers'
    ``UNet2DModel`` (GroupNorm instead of InstanceNorm++). The training loss (in ``lightning_modules.mcvd``) is the
    mean instead of the sum of squared errors, a constant factor that Adam's step size does not see.

    Args:
        in_frames: past frames k concatenated as conditioning (``data.init_args.history``, linked by the CLI).
        channels: channels per frame.
        block_out_channels, down_block_types, up_block_types, layers_per_block, attention_head_dim,
            norm_num_groups, dropout: the ``diffusers.UNet2DModel`` arguments of the same names.
        num_train_timesteps, beta_schedule, beta_start, beta_end: the ``diffusers.DDPMScheduler`` noise schedule.
        clip_sample: clip the predicted clean frame to [-1, 1] at every sampling step (the paper's ``clip_before``).
        p_mask: probability that a training sample's past frames are all set to zero (the paper masks the whole past
            of a sample at once).
        sampler: ``ddpm`` (ancestral) or ``ddim``.
        sampling_steps: denoising steps at sampling (evenly spaced training timesteps).
        eta: DDIM's noise scale (0: deterministic given the initial noise); ignored by DDPM.
    """

    def __init__(
        self,
        in_frames: int = 1,
        channels: int = 3,
        block_out_channels: Sequence[int] = (128, 128, 256, 384, 512),
        down_block_types: Sequence[str] = (
            "DownBlock2D",
            "DownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
        ),
        up_block_types: Sequence[str] = (
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "UpBlock2D",
            "UpBlock2D",
        ),
        layers_per_block: int = 2,
        attention_head_dim: int = 128,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        clip_sample: bool = True,
        p_mask: float = 0.5,
        sampler: Literal["ddpm", "ddim"] = "ddpm",
        sampling_steps: int = 100,
        eta: float = 0.0,
    ):
        super().__init__()
        if in_frames < 1:
            raise ValueError(f"in_frames must be >= 1, got {in_frames}")
        if not 0.0 <= p_mask <= 1.0:
            raise ValueError(f"p_mask must be in [0, 1], got {p_mask}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not 1 <= sampling_steps <= num_train_timesteps:
            raise ValueError(
                f"sampling_steps must be in [1, num_train_timesteps={num_train_timesteps}], got {sampling_steps}"
            )
        self.in_frames = in_frames
        self.channels = channels
        self.p_mask = p_mask
        self.sampling_steps = sampling_steps
        self.eta = eta
        self.unet = UNet2DModel(
            in_channels=channels * (in_frames + 1),
            out_channels=channels,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
        )
        schedule = dict(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            clip_sample=clip_sample,
            prediction_type="epsilon",
        )
        self.noise_schedule = DDPMScheduler(**schedule)
        self.sampling_scheduler = (
            DDPMScheduler(**schedule) if sampler == "ddpm" else DDIMScheduler(**schedule)
        )
        self.sampler = sampler

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_schedule.config.num_train_timesteps

    def condition(self, history: Tensor) -> Tensor:
        """The past frames ``(B, k, C, H, W)`` in [0, 1] as ``(B, k * C, H, W)`` conditioning in [-1, 1]."""
        if history.ndim != 5 or history.shape[1] != self.in_frames or history.shape[2] != self.channels:
            raise ValueError(
                f"expected a history (B, {self.in_frames}, {self.channels}, H, W), got {tuple(history.shape)}"
            )
        return to_diffusion_range(history).flatten(1, 2)

    def mask_condition(self, condition: Tensor, keep: Tensor) -> Tensor:
        """Zero the whole conditioning of the samples where ``keep`` (``(B,)`` bool) is False."""
        return condition * keep.to(condition.dtype).view(-1, 1, 1, 1)

    def add_noise(self, clean: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` (the DDPM forward process)."""
        return self.noise_schedule.add_noise(clean, noise, timesteps)

    def forward(self, noisy: Tensor, timesteps: Tensor, condition: Tensor) -> Tensor:
        """Predicted noise ``(B, C, H, W)`` of ``noisy`` at ``timesteps`` given the (masked) ``condition``."""
        return self.unet(torch.cat([noisy, condition], dim=1), timesteps).sample

    @torch.no_grad()
    def sample(self, history: Tensor, generators: list[torch.Generator]) -> Tensor:
        """The next frame ``(B, C, H, W)`` in [0, 1]; sample i's noise (initial and per step) comes from
        ``generators[i]`` alone, so it does not depend on the other samples of the batch."""
        if len(generators) != history.shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {history.shape[0]}")
        condition = self.condition(history)
        batch, _, height, width = condition.shape
        noise = [torch.randn((1, self.channels, height, width), generator=g) for g in generators]
        sample = torch.cat(noise).to(condition)
        self.sampling_scheduler.set_timesteps(self.sampling_steps, device=condition.device)
        extra = {"eta": self.eta} if self.sampler == "ddim" else {}
        for timestep in self.sampling_scheduler.timesteps:
            epsilon = self(sample, timestep.expand(batch), condition)
            sample = self.sampling_scheduler.step(
                epsilon, timestep, sample, generator=generators, **extra
            ).prev_sample
        return (sample.clamp(-1.0, 1.0) + 1.0) / 2.0
