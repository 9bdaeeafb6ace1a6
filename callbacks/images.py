"""The validation panel callback and the PNG + W&B output every forecast picture goes through.

The pictures themselves are drawn by ``figures``; they are PNG files in the run folder (``trainer.default_root_dir``,
where the CLI also puts checkpoints, predictions and results) and are also logged to W&B, with their metrics as
caption, when the trainer has a ``WandbLogger``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure

from figures import ERROR_SCALE, forecast_panel, save_png
from figures.forecast import check_panel_images

IMAGE_KEYS = ("input", "target", "forecast")
"""Keys ``last_val_images`` must hold; an optional ``mask`` ``(B, H, W)`` marks the valid pixels."""


def save_and_log_image(
    image: Figure | str | Path,
    path: str | Path | None = None,
    loggers: Iterable[Logger] = (),
    key: str = "image",
    step: int | None = None,
    caption: str | None = None,
) -> Path:
    """Write a figure as PNG to ``path`` (or take an existing PNG file as ``image``) and log it with its caption
    as an image panel under ``key`` to every ``WandbLogger`` in ``loggers``; returns the PNG's path."""
    if isinstance(image, Figure):
        if path is None:
            raise ValueError(f"save_and_log_image: a figure needs a path to be written to (W&B key {key!r})")
        png = save_png(image, path)
    else:
        png = Path(image)
        if path is not None and Path(path) != png:
            raise ValueError(f"save_and_log_image: got the PNG {png} and a different path {path}")
        if not png.is_file():
            raise FileNotFoundError(f"save_and_log_image: no PNG at {png} (W&B key {key!r})")
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            extra = {"caption": [caption]} if caption else {}
            logger.log_image(key=key, images=[str(png)], step=step, **extra)
    return png


def run_directory(trainer: Trainer) -> Path:
    """The run folder, ``trainer.default_root_dir`` (the CLI sets it to ``runs/<config>/<time>``), which also holds
    the checkpoints, predictions and results; call on every rank (rank 0's folder is broadcast)."""
    return Path(trainer.strategy.broadcast(str(trainer.default_root_dir)))


class ForecastImageCallback(Callback):
    """Save a validation panel per epoch as ``images/epoch_XXX.png``: input | truth | forecast | |error|, one row
    per sample, with a shared percentile stretch per row, PSNR/SSIM/GSSIM under the forecast and an |error| map
    on a fixed scale (0 to ``error_scale`` reflectance, see ``figures.error_norm``) with its colorbar.

    Contract with the LightningModule: it defines ``last_val_images`` (``None`` until set) and, in
    ``validation_step`` of the first batch, stores ``dict(input=(B, 3, H, W), target=..., forecast=...)``: the
    last input frame, the true next frame and the forecast, floats in [0, 1] (detached, best on CPU), and
    optionally ``mask`` ``(B, H, W)``, the valid pixels (metrics and stretch use only those; invalid ones are grey).
    The forecast column is named by the module's ``model_name()`` when it has one. The panel also goes to W&B
    (``val/forecast_grid``, captioned with the metrics) when a ``WandbLogger`` is attached. The contract is checked
    at ``setup`` and on the sanity-check epoch, so a module that breaks it fails before training, not mid-run.
    """

    def __init__(
        self, num_samples: int = 4, error_scale: float = ERROR_SCALE, every_n_epochs: int = 1
    ) -> None:
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
        model = pl_module.model_name() if hasattr(pl_module, "model_name") else type(pl_module).__name__
        forecasts = {model: images["forecast"]}
        check_panel_images(images["input"], images["target"], forecasts, images.get("mask"))
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        path = run_directory(trainer) / "images" / f"epoch_{trainer.current_epoch:03d}.png"  # on every rank
        if not trainer.is_global_zero:
            return
        picture = forecast_panel(
            images["input"],
            images["target"],
            forecasts,
            images.get("mask"),
            self.num_samples,
            self.error_scale,
            title=f"{model} validation, epoch {trainer.current_epoch}",
        )
        save_and_log_image(
            picture.figure, path, trainer.loggers, "val/forecast_grid", trainer.global_step, picture.caption
        )
