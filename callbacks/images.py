"""Pictures of forecasts: the validation grid callback and the rollout strip.

Both are PNG files in the run folder (``trainer.default_root_dir``, where the CLI also puts checkpoints, predictions
and results) and are also logged to W&B when the trainer has a ``WandbLogger``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

GRID_COLUMNS = ("input", "truth", "forecast", "abs error")
IMAGE_KEYS = ("input", "target", "forecast")
LABEL_HEIGHT = 14
LABEL_WIDTH = 56
PADDING = 2


def _to_pil(image: Tensor) -> Image.Image:
    """``(3, H, W)`` floats in [0, 1] to an RGB image (values outside are clipped)."""
    array = (image.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def labelled_grid(
    tiles: Tensor, column_labels: Sequence[str], row_labels: Sequence[str] | None = None
) -> Image.Image:
    """Tile ``(rows, columns, 3, H, W)`` images in [0, 1] into one picture with a label over each column
    (and before each row when ``row_labels`` is given)."""
    rows, columns = tiles.shape[:2]
    if len(column_labels) != columns or (row_labels is not None and len(row_labels) != rows):
        raise ValueError(
            f"labelled_grid: {rows}x{columns} tiles need {columns} column labels and {rows} row labels, got "
            f"{len(column_labels)} and {None if row_labels is None else len(row_labels)}"
        )
    grid = _to_pil(make_grid(tiles.flatten(0, 1), nrow=columns, padding=PADDING, pad_value=1.0))
    tile_height, tile_width = tiles.shape[-2] + PADDING, tiles.shape[-1] + PADDING
    left = LABEL_WIDTH if row_labels is not None else 0
    canvas = Image.new("RGB", (left + grid.width, LABEL_HEIGHT + grid.height), "white")
    canvas.paste(grid, (left, LABEL_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for column, label in enumerate(column_labels):
        draw.text((left + column * tile_width + PADDING, 1), label, fill="black", font=font)
    for row, label in enumerate(row_labels or ()):
        draw.text(
            (2, LABEL_HEIGHT + row * tile_height + tile_height // 2 - 5), label, fill="black", font=font
        )
    return canvas


def forecast_grid(
    input: Tensor, target: Tensor, forecast: Tensor, num_samples: int = 4, error_scale: float = 0.1
) -> Image.Image:
    """One row per sample: input | truth | forecast | abs error, from ``(B, 3, H, W)`` tensors in [0, 1].

    The error tile is the mean absolute error over channels, white at ``error_scale`` or more, so grids of
    different epochs share one scale.
    """
    images = {"input": input, "target": target, "forecast": forecast}
    for key, value in images.items():
        if value.ndim != 4 or value.shape[1] != 3 or value.shape != target.shape:
            raise ValueError(
                f"forecast images: {key!r} must be (B, 3, H, W) like 'target' {tuple(target.shape)}, "
                f"got {tuple(value.shape)}"
            )
    shown = slice(0, num_samples)
    input, target, forecast = (value[shown].detach().float().cpu() for value in images.values())
    error = (
        ((forecast - target).abs().mean(dim=1, keepdim=True) / error_scale).clamp(0.0, 1.0).expand_as(target)
    )
    return labelled_grid(torch.stack([input, target, forecast, error], dim=1), GRID_COLUMNS)


def rollout_strip(truth: Tensor, forecast: Tensor, times: Sequence[str] | None = None) -> Image.Image:
    """Real frames over forecasts, one column per time step (e.g. per year).

    ``truth`` is ``(T, 3, H, W)``; ``forecast`` is ``(F, 3, H, W)`` with ``F <= T`` and forecasts the last ``F``
    frames (a rollout starting after ``T - F`` real frames), so earlier columns show the real inputs over a grey
    tile. Columns are labelled by ``times`` (length ``T``), or by frame index.
    """
    if (
        truth.ndim != 4
        or forecast.ndim != 4
        or forecast.shape[1:] != truth.shape[1:]
        or len(forecast) > len(truth)
    ):
        raise ValueError(
            f"rollout_strip: expected truth (T, 3, H, W) and forecast (F <= T, 3, H, W), "
            f"got {tuple(truth.shape)} and {tuple(forecast.shape)}"
        )
    num_frames = len(truth)
    if times is not None and len(times) != num_frames:
        raise ValueError(f"rollout_strip: {len(times)} times for {num_frames} frames")
    labels = (
        [str(time) for time in times] if times is not None else [f"t{index}" for index in range(num_frames)]
    )
    truth = truth.detach().float().cpu()
    no_forecast = torch.full_like(truth[: num_frames - len(forecast)], 0.5)
    forecast_row = torch.cat([no_forecast, forecast.detach().float().cpu()])
    return labelled_grid(torch.stack([truth, forecast_row]), labels, row_labels=["truth", "forecast"])


def save_and_log_image(
    image: Image.Image,
    path: str | Path,
    loggers: Iterable[Logger] = (),
    key: str = "image",
    step: int | None = None,
) -> Path:
    """Write ``image`` as PNG to ``path`` and log it under ``key`` to every ``WandbLogger`` in ``loggers``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
    return path


def run_directory(trainer: Trainer) -> Path:
    """The run folder, ``trainer.default_root_dir`` (the CLI sets it to ``runs/<config>/<time>``), which also holds
    the checkpoints, predictions and results; call on every rank (rank 0's folder is broadcast)."""
    return Path(trainer.strategy.broadcast(str(trainer.default_root_dir)))


class ForecastImageCallback(Callback):
    """Save a validation grid (input | truth | forecast | abs error) per epoch as ``images/epoch_XXX.png``.

    Contract with the LightningModule: it defines ``last_val_images`` (``None`` until set) and, in
    ``validation_step`` of the first batch, stores ``dict(input=(B, 3, H, W), target=..., forecast=...)``: the
    last input frame, the true next frame and the forecast, floats in [0, 1] (detached, best on CPU). The grid
    also goes to W&B (``val/forecast_grid``) when a ``WandbLogger`` is attached. The contract is checked at
    ``setup`` and on the sanity-check epoch, so a module that breaks it fails before training, not mid-run.
    """

    def __init__(self, num_samples: int = 4, error_scale: float = 0.1, every_n_epochs: int = 1) -> None:
        super().__init__()
        if num_samples < 1 or every_n_epochs < 1 or error_scale <= 0:
            raise ValueError(
                "ForecastImageCallback: num_samples and every_n_epochs must be >= 1 and error_scale > 0, got "
                f"{num_samples}, {every_n_epochs}, {error_scale}"
            )
        self.num_samples = num_samples
        self.error_scale = error_scale
        self.every_n_epochs = every_n_epochs

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and not hasattr(pl_module, "last_val_images"):
            raise AttributeError(
                f"ForecastImageCallback needs {type(pl_module).__name__}.last_val_images (set to None in __init__, "
                "filled from the first validation batch with input/target/forecast tensors)"
            )

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        images: dict[str, Any] | None = pl_module.last_val_images
        if images is None:
            rank_zero_warn("ForecastImageCallback: last_val_images was not set this epoch; no grid saved")
            return
        missing = [key for key in IMAGE_KEYS if key not in images]
        if missing:
            raise KeyError(
                f"{type(pl_module).__name__}.last_val_images lacks {missing} (needs {list(IMAGE_KEYS)})"
            )
        grid = forecast_grid(
            images["input"], images["target"], images["forecast"], self.num_samples, self.error_scale
        )
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        path = run_directory(trainer) / "images" / f"epoch_{trainer.current_epoch:03d}.png"
        if trainer.is_global_zero:
            save_and_log_image(grid, path, trainer.loggers, key="val/forecast_grid", step=trainer.global_step)
