"""Validation grid callback and rollout strips: PNGs in the run folder, W&B logging, contract errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from callbacks.images import (
    ForecastImageCallback,
    forecast_grid,
    rollout_strip,
    run_directory,
    save_and_log_image,
)

SIZE = 8


class NextFrameData(Dataset):
    """Forecasting batches as in docs/DESIGN.md, tiny: (k=1, 3, 8, 8) history and a (3, 8, 8) target."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        image = torch.rand(1, 3, SIZE, SIZE, generator=generator)
        return {"image": image, "target": (image[0] + 0.1).clamp(0, 1)}


class TinyForecaster(LightningModule):
    """Keeps ``last_val_images`` from the first validation batch, as the callback's contract asks."""

    def __init__(self, store: bool = True):
        super().__init__()
        self.network = nn.Conv2d(3, 3, 1)
        self.store = store
        self.last_val_images = None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image[:, -1]).sigmoid()

    def training_step(self, batch, batch_idx):
        return (self(batch["image"]) - batch["target"]).abs().mean()

    def validation_step(self, batch, batch_idx):
        forecast = self(batch["image"])
        if batch_idx == 0 and self.store:
            self.last_val_images = {
                "input": batch["image"][:, -1],
                "target": batch["target"],
                "forecast": forecast,
            }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    return DataLoader(NextFrameData(), batch_size=3)


def trainer(tmp_path, **kwargs) -> Trainer:
    settings = dict(
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=1,
    )
    settings.update(kwargs)
    return Trainer(**settings)


def test_callback_writes_one_grid_per_epoch(tmp_path):
    callback = ForecastImageCallback(num_samples=2)
    trainer(tmp_path, callbacks=[callback]).fit(TinyForecaster(), loader(), loader())
    written = sorted(path.name for path in (tmp_path / "images").iterdir())
    assert written == ["epoch_000.png", "epoch_001.png"]  # nothing for the sanity check
    grid = np.asarray(Image.open(tmp_path / "images" / "epoch_001.png"))
    tile = SIZE + 2
    assert grid.shape[1] == 4 * tile + 2 and grid.shape[0] > 2 * tile + 2  # 4 columns, 2 samples + labels
    assert grid.std() > 0


def tile_centres(image: Image.Image, rows: int, columns: int) -> np.ndarray:
    """Red value at the centre of every tile; tiles sit at the bottom right, under/after the labels."""
    pixels = np.asarray(image)
    tile = SIZE + 2  # make_grid's padding of 2
    top, left = image.height - (rows * tile + 2), image.width - (columns * tile + 2)
    return np.array(
        [
            [
                pixels[top + 2 + row * tile + SIZE // 2, left + 2 + column * tile + SIZE // 2, 0]
                for column in range(columns)
            ]
            for row in range(rows)
        ]
    )


def test_grid_tiles_show_input_truth_forecast_and_scaled_error():
    target = torch.zeros(1, 3, SIZE, SIZE)
    forecast = torch.full_like(target, 0.025)  # a quarter of error_scale
    grid = forecast_grid(torch.ones_like(target), target, forecast, error_scale=0.1)
    assert tile_centres(grid, rows=1, columns=4).tolist() == [[255, 0, 6, 64]]


def test_module_without_last_val_images_fails_before_training(tmp_path):
    module = TinyForecaster()
    del module.last_val_images
    with pytest.raises(AttributeError, match="last_val_images"):
        trainer(tmp_path, callbacks=[ForecastImageCallback()]).fit(module, loader(), loader())


def test_incomplete_images_fail_in_the_sanity_check(tmp_path):
    class MissingForecast(TinyForecaster):
        def validation_step(self, batch, batch_idx):
            self.last_val_images = {"input": batch["image"][:, -1], "target": batch["target"]}

    with pytest.raises(KeyError, match="forecast"):
        trainer(tmp_path, callbacks=[ForecastImageCallback()]).fit(MissingForecast(), loader(), loader())
    assert not (tmp_path / "images").exists()


def test_unset_images_warn_and_save_nothing(tmp_path):
    with pytest.warns(UserWarning, match="last_val_images was not set"):
        trainer(tmp_path, callbacks=[ForecastImageCallback()], max_epochs=1).fit(
            TinyForecaster(store=False), loader(), loader()
        )
    assert not (tmp_path / "images").exists()


def test_images_go_to_the_run_folder_whatever_the_logger(tmp_path):
    """The run folder is ``default_root_dir`` (the CLI's ``runs/<config>/<time>``), not the logger's version folder,
    so images sit beside the checkpoints and results."""
    logger = CSVLogger(tmp_path / "logs", name="satdiff")
    fit = trainer(tmp_path, logger=logger, callbacks=[ForecastImageCallback()], max_epochs=1)
    fit.fit(TinyForecaster(), loader(), loader())
    assert run_directory(fit) == tmp_path
    assert (tmp_path / "images" / "epoch_000.png").is_file()
    assert not (tmp_path / "logs" / "satdiff" / "version_0" / "images").exists()


def test_rollout_strip_puts_truth_over_forecast():
    truth = torch.zeros(4, 3, SIZE, SIZE)
    forecast = torch.ones(2, 3, SIZE, SIZE)  # forecasts of the last two frames
    strip = rollout_strip(truth, forecast, times=["2019", "2020", "2021", "2022"])
    assert tile_centres(strip, rows=2, columns=4).tolist() == [[0, 0, 0, 0], [128, 128, 255, 255]]
    with pytest.raises(ValueError, match="3 times for 4 frames"):
        rollout_strip(truth, forecast, times=["a", "b", "c"])
    with pytest.raises(ValueError, match="forecast"):
        rollout_strip(truth, torch.ones(5, 3, SIZE, SIZE))


def test_save_and_log_image_logs_to_wandb(tmp_path, monkeypatch):
    logger = WandbLogger(save_dir=tmp_path, offline=True)
    calls = []
    monkeypatch.setattr(logger, "log_image", lambda **kwargs: calls.append(kwargs))
    strip = rollout_strip(torch.rand(2, 3, SIZE, SIZE), torch.rand(1, 3, SIZE, SIZE))
    path = save_and_log_image(
        strip, tmp_path / "rollouts" / "strip.png", [logger], key="test/rollout", step=3
    )
    with Image.open(path) as written:
        assert written.size == strip.size
    assert len(calls) == 1 and calls[0]["key"] == "test/rollout" and calls[0]["step"] == 3
    assert calls[0]["images"] == [strip]
