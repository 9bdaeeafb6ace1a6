"""Deterministic forecasting baselines (persistence, SimVP, PredRNN) trained with masked pixel losses."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_modules.forecast_task import ForecastTask, masked_pixel_loss
from metrics.functional import l1, mse


class BaselineForecastModule(ForecastTask):
    """Train any ``(B, k, 3, H, W) -> (B, 3, H, W)`` network with ``l1_weight * L1 + mse_weight * MSE``.

    Both losses are masked by the batch ``mask``. A network with a ``next_frames`` method (PredRNN) forecasts
    after every input frame, and training supervises all k outputs (inputs 2..k and the target), as the paper
    does; validation and test score the final forecast only. A network may leave an auxiliary scalar loss in
    ``aux_loss`` and its weight in ``aux_weight`` after its forward (PredRNN's memory decoupling). With
    ``aux_weighting: relative`` (default) the term is rescaled so that its value is ``aux_weight`` times the
    pixel loss (gradient ``aux_weight * pixel / aux`` times its own): a weight tuned on MNIST-scale MSE keeps its
    meaning at reflectance scale, where the pixel MSE is ~1e-3 and an absolute 0.1 * |cosine| would be most of
    the loss. ``absolute`` adds ``aux_weight * aux_loss`` as the paper's code does. A network without
    trainable parameters (persistence) has nothing to optimise: the module then runs under Lightning's manual
    optimization with no optimizer, so ``fit`` only logs losses, validates and checkpoints, and every baseline
    runs through the same fit/test/predict commands.

    Args:
        network: the forecaster, injected by ``class_path``/``init_args``.
        optimizer: optimizer class and its init args (``lr`` etc.), e.g. ``{class_path: torch.optim.AdamW}``;
            None: AdamW with torch's defaults. The default is None rather than AdamW because jsonargparse
            carries a default's init args over to a configured class: Adam would inherit AdamW's weight_decay.
        scheduler: optional LR scheduler class and init args, stepped every ``scheduler_interval``
            (``epoch`` or ``step``) and monitoring ``val/loss``.
        l1_weight, mse_weight: weights of the masked pixel losses.
        aux_weighting: ``relative`` (auxiliary term scaled to the pixel loss) or ``absolute``.
        **kwargs: ``ForecastTask`` keys (history, metric weights, output folders, rollout_start) and the
            ``BaseTask`` warm-up/cosine schedule (``warmup_epochs``, ``warmup_start_lr``, ``min_lr``).
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        l1_weight: float = 0.0,
        mse_weight: float = 1.0,
        aux_weighting: Literal["relative", "absolute"] = "relative",
        **kwargs: Any,
    ):
        super().__init__(
            optimizer=optimizer, scheduler=scheduler, scheduler_interval=scheduler_interval, **kwargs
        )
        if aux_weighting not in ("relative", "absolute"):
            raise ValueError(f"aux_weighting must be 'relative' or 'absolute', got {aux_weighting!r}")
        self.network = network
        self.automatic_optimization = self.has_trainable_parameters()
        self.l1_weight = l1_weight
        self.mse_weight = mse_weight
        self.aux_weighting = aux_weighting

    def model_name(self) -> str:
        return self.name or type(self.network).__name__

    def forecast(self, image: Tensor) -> Tensor:
        return self.network(image)

    def pixel_loss(self, forecast: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return self.l1_weight * masked_pixel_loss(
            l1, forecast, target, mask
        ) + self.mse_weight * masked_pixel_loss(mse, forecast, target, mask)

    def validation_loss(self, batch: dict[str, Any], forecast: Tensor) -> Tensor:
        return self.pixel_loss(forecast, batch["target"], batch["mask"])

    def has_trainable_parameters(self) -> bool:
        return any(p.requires_grad for p in self.network.parameters())

    def supervised_frames(self, image: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Training forecasts and their targets, ``(N, 3, H, W)`` each (N = B, or B * k with ``next_frames``)."""
        next_frames = getattr(self.network, "next_frames", None)
        if next_frames is None:
            return self.forecast(image), target
        targets = torch.cat([image[:, 1:], target[:, None]], dim=1)
        return next_frames(image).flatten(0, 1), targets.flatten(0, 1)

    def auxiliary_loss(self, pixel_loss: Tensor) -> Tensor | None:
        """The network's ``aux_loss`` weighted by its ``aux_weight`` (relative to the pixel loss by default)."""
        aux_loss = getattr(self.network, "aux_loss", None)
        if aux_loss is None:
            return None
        weight = getattr(self.network, "aux_weight", 1.0)
        if self.aux_weighting == "absolute":
            return weight * aux_loss
        return weight * pixel_loss.detach() * aux_loss / aux_loss.detach().clamp_min(1e-12)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image = batch["image"]
        self.check_history(image)
        forecasts, targets = self.supervised_frames(image, batch["target"])
        mask = batch["mask"].repeat_interleave(forecasts.shape[0] // image.shape[0], dim=0)
        loss = self.pixel_loss(forecasts, targets, mask)
        aux_loss = self.auxiliary_loss(loss)
        batch_size = image.shape[0]
        if aux_loss is not None:
            self.log("train/pixel_loss", loss, batch_size=batch_size)
            self.log("train/aux_loss", aux_loss, batch_size=batch_size)
            loss = loss + aux_loss
        self.log("train/loss", loss, batch_size=batch_size, prog_bar=True)
        return loss
