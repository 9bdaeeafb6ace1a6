"""Deterministic forecasting baselines (persistence, SimVP, PredRNN) trained with masked pixel losses."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_modules.forecast_task import ForecastTask, masked_pixel_loss
from metrics.functional import l1, mse


class BaselineForecastModule(ForecastTask):
    """Train any ``(B, k, 3, H, W) -> (B, 3, H, W)`` network with ``l1_weight * L1 + mse_weight * MSE``.

    Both losses are masked by the batch ``mask``. A network may leave an extra scalar loss in ``aux_loss``
    after its forward (PredRNN's memory decoupling); it is added to the training loss. A network without
    trainable parameters (persistence) gets no optimizer: ``fit`` then only logs losses, validates and
    checkpoints, so every baseline runs through the same fit/test/predict commands.

    Args:
        network: the forecaster, injected by ``class_path``/``init_args``.
        optimizer: optimizer class and its init args (``lr`` etc.), e.g. ``{class_path: torch.optim.AdamW}``.
        scheduler: optional LR scheduler class and init args, stepped every ``scheduler_interval``.
        l1_weight, mse_weight: weights of the masked pixel losses.
        **kwargs: ``ForecastTask`` keys (history, metric weights, output folders, rollout_start).
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        l1_weight: float = 0.0,
        mse_weight: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.network = network
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.l1_weight = l1_weight
        self.mse_weight = mse_weight

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

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        image = batch["image"]
        self.check_history(image)
        forecast = self.forecast(image)
        loss = self.pixel_loss(forecast, batch["target"], batch["mask"])
        aux_loss = getattr(self.network, "aux_loss", None)
        if aux_loss is not None:
            loss = loss + aux_loss
        self.log("train/loss", loss, batch_size=image.shape[0], prog_bar=True)
        return loss if self.has_trainable_parameters() else None

    def configure_optimizers(self) -> Any:
        parameters = [p for p in self.parameters() if p.requires_grad]
        if not parameters:
            return None
        optimizer = self.optimizer(parameters)
        if self.scheduler is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler(optimizer), "interval": self.scheduler_interval}
        scheduler["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
