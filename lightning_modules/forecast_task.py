"""Shared evaluation machinery for every next-frame forecaster (baselines and Sat-JEPA-Diff).

A subclass only says how to forecast (``forecast``) and how to train (``training_step``; optimizer and
schedule follow ``lightning_modules.base.BaseTask``); this class does the rest identically for all models, so
their numbers are comparable:

- validation: clamped forecasts, ``val/loss`` (the checkpoint monitor, ``validation_loss``), ``val/<metric>``
  on valid pixels only (the batch ``mask``; ``owned`` makes overlapping grid windows count each pixel once),
  and ``last_val_images`` (first validation batch) for ``callbacks.ForecastImageCallback``;
- test on single-step batches (``image``/``target``): ``test/<metric>``;
- test on sequence batches (``images``, DataModule ``sequence: true``): an autoregressive rollout from
  ``rollout_start`` to the last frame, each forecast fed back as input, metrics per step as
  ``test/step_<n>/<metric>`` against the real frames, one rollout figure per region (its first window) and a
  plot of each metric per step for every model in the results CSV (``figures``);
- end of test: one table row with every metric (one per rollout step), printed, logged and appended to a CSV
  in the run folder (``metrics.table``), so several models' tests can be shown side by side;
- predict: forecasts (``horizon`` steps per window) returned with the batch's metadata, written by the prediction
  writer ``callbacks.MosaicWriter`` (scene mosaics as Cloud-Optimized GeoTIFFs, or one GeoTIFF per window).

Per-step rollout metrics are created on first use, so under DDP every rank must see sequences of one length.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torchmetrics import MetricCollection

from callbacks.images import run_directory, save_and_log_image
from figures import RegionRollouts, metrics_per_step_figure
from lightning_modules.base import BaseTask
from metrics.forecast import ForecastMetrics
from metrics.functional import l1
from metrics.table import append_row, format_table, metric_row, read_rows

RESULTS_CSV_NAME = "test_results.csv"


def masked_pixel_loss(
    loss: Callable[[Tensor, Tensor], Tensor], forecast: Tensor, target: Tensor, mask: Tensor
) -> Tensor:
    """Apply a ``metrics.functional`` pixel loss to the valid pixels only (``mask`` is ``(B, H, W)``).

    The valid pixel values are gathered into a ``(1, 1, 1, N)`` image, so the loss is their exact mean; with no
    valid pixel the loss is a zero that still belongs to the graph.
    """
    keep = mask[:, None].expand_as(forecast)
    if not keep.any():
        return forecast.sum() * 0.0
    return loss(forecast[keep].view(1, 1, 1, -1), target[keep].view(1, 1, 1, -1))


def sample_keys(
    batch: dict[str, Any], target_times: list[str] | None = None, step: int = 1
) -> list[str] | None:
    """One identity per sample, ``region|window|target time|rollout step`` (the window named by its transform),
    so a stochastic forecaster can seed each sample's noise whatever the batching; None if the batch lacks them.
    """
    regions, transforms = batch.get("region"), batch.get("transform")
    target_times = target_times if target_times is not None else batch.get("target_time")
    if regions is None or transforms is None or target_times is None:
        return None
    return [
        f"{region}|{','.join(repr(float(v)) for v in transform)}|{time}|{step}"
        for region, transform, time in zip(regions, transforms, target_times, strict=True)
    ]


class ForecastTask(BaseTask, ABC):
    """Base LightningModule for forecasting ``(B, k, 3, H, W)`` histories to the next frame ``(B, 3, H, W)``.

    Args:
        history: frames per input (k); must equal the DataModule's ``history`` (checked on every batch).
        lpips_weights, fid_weights, fid_feature: passed to ``metrics.ForecastMetrics`` (local weight paths;
            LPIPS/FID are skipped with a warning when None).
        name: the model's name in the results table (default: ``model_name()``).
        predict_dir: folder ``callbacks.MosaicWriter`` writes forecasts to (default: ``predictions/`` in the run folder).
        results_csv: CSV the test rows are appended to (default: ``<default_root_dir>/test_results.csv``, shared
            by every run under that folder).
        rollout_start: index of the last real frame a rollout starts from (default: ``history - 1``).
        **kwargs: ``BaseTask`` keys (optimizer, scheduler, warm-up/cosine schedule).
    """

    metric_splits = ("val", "test")

    def __init__(
        self,
        history: int = 1,
        lpips_weights: str | None = None,
        fid_weights: str | None = None,
        fid_feature: int = 2048,
        name: str | None = None,
        predict_dir: str | None = None,
        results_csv: str | None = None,
        rollout_start: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        start = history - 1 if rollout_start is None else rollout_start
        if start < history - 1:
            raise ValueError(f"rollout_start={start} leaves fewer than history={history} real input frames")
        self.history = history
        self.lpips_weights = lpips_weights
        self.fid_weights = fid_weights
        self.fid_feature = fid_feature
        self.name = name
        self.predict_dir = predict_dir
        self.results_csv = results_csv
        self.rollout_start = start
        self.last_val_images: dict[str, Tensor] | None = None
        self.rollout_metrics = nn.ModuleDict()
        self.region_rollouts = RegionRollouts()
        self.single_step_test_batches = 0
        self.build_metrics()

    # ----- what subclasses provide -------------------------------------------------------------------------
    @abstractmethod
    def forecast(self, image: Tensor) -> Tensor:
        """Forecast the next frame ``(B, 3, H, W)`` from a history ``(B, k, 3, H, W)`` (unclamped is fine)."""

    def validation_loss(self, batch: dict[str, Any], forecast: Tensor) -> Tensor:
        """Loss logged as ``val/loss`` for checkpoint selection; masked L1 unless a subclass knows better."""
        return masked_pixel_loss(l1, forecast, batch["target"], batch["mask"])

    def model_name(self) -> str:
        """Row label in the results table: ``name`` if configured, else the class name."""
        return self.name or type(self).__name__

    # ----- shared machinery --------------------------------------------------------------------------------
    def configure_metrics(self) -> MetricCollection:
        """The forecast metrics, cloned into ``val_metrics`` and ``test_metrics`` by ``build_metrics``."""
        return ForecastMetrics(
            lpips_weights=self.lpips_weights, fid_weights=self.fid_weights, fid_feature=self.fid_feature
        )

    def check_history(self, image: Tensor) -> None:
        """Fail clearly when the DataModule's history length differs from the model's ``history`` key."""
        if image.ndim != 5 or image.shape[1] != self.history:
            raise ValueError(
                f"expected a history of shape (B, {self.history}, C, H, W) (model key `history`), got "
                f"{tuple(image.shape)}; set the model's `history` to the DataModule's `history`"
            )

    def forecast_samples(self, image: Tensor, sample_keys: list[str] | None) -> Tensor:
        """``forecast`` given each sample's identity (``sample_keys``); stochastic forecasters override this to
        seed each sample's noise from it, deterministic ones ignore it."""
        return self.forecast(image)

    def predict_next(self, image: Tensor, sample_keys: list[str] | None = None) -> Tensor:
        """The clamped forecast every evaluation path uses (contiguous: metric states reshape it with ``view``)."""
        self.check_history(image)
        return self.forecast_samples(image, sample_keys).clamp(0.0, 1.0).contiguous()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        forecast = self.predict_next(batch["image"], sample_keys(batch))
        loss = self.validation_loss(batch, forecast)
        batch_size = forecast.shape[0]
        self.log("val/loss", loss, batch_size=batch_size, sync_dist=True, prog_bar=True)
        self.val_metrics.update(forecast, batch["target"], mask=batch["mask"], owned=batch.get("owned"))
        if batch_idx == 0:
            self.last_val_images = {
                "input": batch["image"][:, -1].detach().cpu(),
                "target": batch["target"].detach().cpu(),
                "forecast": forecast.detach().cpu(),
                "mask": batch["mask"].detach().cpu(),
            }
        return loss

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "images" in batch:
            self.rollout(batch, batch_idx)
            return
        forecast = self.predict_next(batch["image"], sample_keys(batch))
        self.log(
            "test/loss", self.validation_loss(batch, forecast), batch_size=forecast.shape[0], sync_dist=True
        )
        self.test_metrics.update(forecast, batch["target"], mask=batch["mask"], owned=batch.get("owned"))
        self.single_step_test_batches += 1

    def rollout(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Autoregressive rollout: feed each forecast back in up to the last frame, scoring every step."""
        images, masks = batch["images"], batch["mask"]
        num_frames = images.shape[1]
        start = self.rollout_start
        if start >= num_frames - 1:
            raise ValueError(
                f"rollout_start={start} leaves nothing to forecast in a sequence of {num_frames} frames "
                f"(regions {batch['region']})"
            )
        frames = list(images[:, : start + 1].unbind(1))
        valid_inputs = masks[:, : start + 1].all(dim=1)
        forecasts, scored = [], []
        for step, target_index in enumerate(range(start + 1, num_frames), start=1):
            keys = sample_keys(batch, [times[target_index] for times in batch["times"]], step)
            forecast = self.predict_next(torch.stack(frames[-self.history :], dim=1), keys)
            frames.append(forecast)
            forecasts.append(forecast)
            metrics = self.step_metrics(step)
            valid = valid_inputs & masks[:, target_index]
            scored.append(valid)
            metrics.update(forecast, images[:, target_index], mask=valid, owned=batch.get("owned"))
        self.keep_rollout_windows(batch, torch.stack(forecasts, dim=1), torch.stack(scored, dim=1))

    def step_metrics(self, step: int) -> nn.Module:
        """Metrics of rollout step ``step`` (``test/step_<n>/``), created on first use."""
        key = str(step)
        if key not in self.rollout_metrics:
            metrics = self.test_metrics.clone(prefix=f"test/step_{step}/")
            metrics.reset()
            self.rollout_metrics[key] = metrics.to(self.device)
        return self.rollout_metrics[key]

    def keep_rollout_windows(self, batch: dict[str, Any], forecasts: Tensor, scored: Tensor) -> None:
        """Keep each region's first window (``forecasts`` ``(B, F, 3, H, W)``, ``scored`` ``(B, F, H, W)`` the
        pixels each step is scored on) for its rollout figure, drawn at the end of the test."""
        for i, region in enumerate(batch["region"]):
            self.region_rollouts.add(
                region, batch["images"][i], forecasts[i], batch["mask"][i], scored[i], batch["times"][i]
            )

    def save_rollout_figures(self) -> None:
        """Write ``rollouts/<model>_<region>.png`` per region this rank kept and, on rank 0,
        ``rollouts/metrics_per_step.png`` (each metric per year for every model in the results CSV), each also
        logged to W&B with its metrics as caption."""
        folder = run_directory(self.trainer) / "rollouts"  # on every rank: a collective call
        step_labels = self.region_rollouts.step_labels()
        for region, picture in self.region_rollouts.pictures(self.model_name()):
            save_and_log_image(
                picture.figure, folder / f"{self.model_name()}_{region}.png", self.trainer.loggers,
                f"test/rollout/{region}", self.global_step, picture.caption,
            )  # fmt: skip
        self.region_rollouts = RegionRollouts()
        if self.trainer.is_global_zero:
            picture = metrics_per_step_figure(
                read_rows(self.results_path()), step_labels=step_labels, title="rollout metrics per step"
            )
            save_and_log_image(
                picture.figure, folder / "metrics_per_step.png", self.trainer.loggers,
                "test/rollout_metrics_per_step", self.global_step, picture.caption,
            )  # fmt: skip

    def on_test_epoch_start(self) -> None:
        self.single_step_test_batches = 0
        self.rollout_metrics.clear()
        self.region_rollouts = RegionRollouts()

    def on_test_epoch_end(self) -> None:
        values = self.epoch_metrics(self.test_metrics)
        for metrics in self.rollout_metrics.values():
            values.update(self.epoch_metrics(metrics))
        self.log_dict(values)
        self.report_test_row({key: float(value) for key, value in values.items()})
        if self.rollout_metrics:
            self.save_rollout_figures()

    def results_path(self) -> Path:
        """The results CSV test rows are appended to (``results_csv``, else in the run folder)."""
        return Path(self.results_csv or Path(self.trainer.default_root_dir) / RESULTS_CSV_NAME)

    @rank_zero_only
    def report_test_row(self, values: dict[str, float]) -> None:
        """Print the model's table row (one per rollout step) and append it to the run folder's results CSV."""
        rows = {}
        if self.single_step_test_batches:
            rows[self.model_name()] = metric_row(values)
        for step in self.rollout_metrics:
            rows[f"{self.model_name()} step {step}"] = metric_row(values, prefix=f"test/step_{step}/")
        path = self.results_path()
        for model, metrics in rows.items():
            append_row(path, model, metrics)
        print(format_table(rows))
        left_out = {key: int(value) for key, value in values.items() if key.endswith("partial_windows")}
        if any(left_out.values()):
            print(
                f"windows with invalid pixels, scored by the pixel metrics but left out of GSSIM/LPIPS/FID: {left_out}"
            )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Forecast ``horizon`` steps per window (the batch's ``horizon``, else 1; each forecast fed back as the
        newest input) and return the batch's metadata with ``forecast`` ``(B, steps, 3, H, W)``, for the
        prediction writer (``callbacks.MosaicWriter``) to write."""
        if "image" not in batch:
            raise ValueError("predict writes next-frame forecasts; set the DataModule's `sequence` to false")
        steps = int(batch["horizon"].max()) if "horizon" in batch else 1
        frames, forecasts = list(batch["image"].unbind(1)), []
        for step in range(1, steps + 1):
            forecast = self.predict_next(
                torch.stack(frames[-self.history :], dim=1), sample_keys(batch, step=step)
            )
            frames.append(forecast)
            forecasts.append(forecast)
        inputs = ("image", "target", "embedding", "has_embedding")
        return {
            **{k: v for k, v in batch.items() if k not in inputs},
            "forecast": torch.stack(forecasts, dim=1),
        }
