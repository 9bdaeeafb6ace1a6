"""MCVD (masked conditional video diffusion) trained and evaluated as a next-frame forecaster."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_modules.forecast import pixel_keys, run_seed, stable_seed
from lightning_modules.forecast_task import ForecastTask, masked_pixel_loss, sample_keys
from metrics.functional import mse
from networks.baselines.mcvd import MCVD, to_diffusion_range


class MCVDModule(ForecastTask):
    """Train ``networks.baselines.MCVD`` with the DDPM epsilon loss and forecast by sampling it.

    Training: per sample a timestep ``t ~ U{0..T-1}``, noise ``eps ~ N(0, I)`` and, with probability
    ``network.p_mask``, a masked (zeroed) past; the loss is the MSE between predicted and true noise over the
    valid pixels of the batch ``mask`` (invalid target pixels are zeroed before noising so NaN cannot reach the
    UNet). Each sample's draws come from a CPU generator seeded by (run seed, global step, the sample's window
    identity), so training does not depend on batching and DDP ranks draw independently.

    Forecasting samples the network (DDPM or DDIM, ``network.sampler``) from noise seeded by (``sampling_seed``,
    region, window, target time, rollout step) via ``forecast_task.sample_keys``, or by the input pixels when the
    batch does not name its windows: a forecast does not depend on the batch or DDP rank it is computed in.
    ``val/loss`` stays the masked L1 of the sampled forecast (``ForecastTask``'s default), so checkpoints are
    selected on forecast quality, not on the denoising loss (which hardly tracks sample quality); at paper size
    sampling the validation split costs ``sampling_steps`` UNet calls per window, so validate every few epochs
    (``trainer.check_val_every_n_epoch``) or on fewer batches (``trainer.limit_val_batches``) if that is too slow.

    Args:
        network: the ``MCVD`` denoiser (UNet widths, noise schedule, ``p_mask``, sampler), injected by
            ``class_path``/``init_args``.
        optimizer, scheduler, scheduler_interval: as ``BaseTask`` (the paper: Adam lr 1e-4, linear warm-up over
            5000 steps, gradient clipping 1.0 via ``trainer.gradient_clip_val``).
        sampling_seed: seed of the sampling noise.
        **kwargs: ``ForecastTask`` keys (history, metric weights, output folders, rollout_start) and the
            ``BaseTask`` warm-up/cosine schedule.
    """

    def __init__(
        self,
        network: MCVD,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        sampling_seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(
            optimizer=optimizer, scheduler=scheduler, scheduler_interval=scheduler_interval, **kwargs
        )
        if network.in_frames != self.history:
            raise ValueError(
                f"model.init_args.network.init_args.in_frames ({network.in_frames}) must equal "
                f"model.init_args.history ({self.history})"
            )
        self.network = network
        self.sampling_seed = sampling_seed

    def model_name(self) -> str:
        return self.name or "MCVD"

    # ----- forecasting -------------------------------------------------------------------------------------
    def sampling_generators(self, image: Tensor, keys: list[str] | None) -> list[torch.Generator]:
        """One CPU generator per sample, seeded by its identity (or its input pixels when there is none)."""
        keys = keys if keys is not None else pixel_keys(image[:, -1])
        if len(keys) != image.shape[0]:
            raise ValueError(f"got {len(keys)} sample keys for a batch of {image.shape[0]}")
        return [torch.Generator().manual_seed(stable_seed(self.sampling_seed, key)) for key in keys]

    def forecast(self, image: Tensor, sample_keys: list[str] | None = None) -> Tensor:
        return self.network.sample(image, self.sampling_generators(image, sample_keys))

    def forecast_samples(self, image: Tensor, sample_keys: list[str] | None) -> Tensor:
        return self.forecast(image, sample_keys)

    # ----- training ----------------------------------------------------------------------------------------
    def training_generators(self, batch: dict[str, Any]) -> list[torch.Generator]:
        """One CPU generator per sample for this step's draws (timestep, masking, noise)."""
        keys = sample_keys(batch) or pixel_keys(batch["image"][:, -1])
        return [
            torch.Generator().manual_seed(stable_seed(run_seed(), "mcvd-train", self.global_step, key))
            for key in keys
        ]

    def denoising_loss(self, batch: dict[str, Any], generators: list[torch.Generator]) -> Tensor:
        """Masked epsilon MSE of one DDPM training draw per sample, each drawn from its own generator."""
        image, mask = batch["image"], batch["mask"]
        self.check_history(image)
        clean = to_diffusion_range(torch.where(mask[:, None], batch["target"], 0.0))
        timesteps, keep, noise = [], [], []
        for generator in generators:
            timesteps.append(torch.randint(self.network.num_train_timesteps, (1,), generator=generator))
            keep.append(torch.rand((1,), generator=generator) >= self.network.p_mask)
            noise.append(torch.randn(clean.shape[1:], generator=generator))
        timesteps, keep = torch.cat(timesteps).to(image.device), torch.cat(keep).to(image.device)
        noise = torch.stack(noise).to(clean)
        condition = self.network.mask_condition(self.network.condition(image), keep)
        predicted = self.network(self.network.add_noise(clean, noise, timesteps), timesteps, condition)
        return masked_pixel_loss(mse, predicted, noise, mask)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.denoising_loss(batch, self.training_generators(batch))
        self.log("train/loss", loss, batch_size=batch["image"].shape[0], prog_bar=True)
        return loss
