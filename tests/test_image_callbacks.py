"""Validation panel callback: PNGs in the run folder, W&B logging with captions, contract errors, brightness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from callbacks.images import ForecastImageCallback, run_directory, save_and_log_image
from metrics.functional import psnr

SIZE = 8
DEMO_REGION = Path(__file__).resolve().parents[1] / "data" / "demo" / "austria_r0c0"


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
    assert grid.shape[1] > grid.shape[0] > 0 and grid.std() > 0  # 4 columns side by side, 2 rows


def demo_frame(time: str) -> torch.Tensor:
    """A real Sentinel-2 RGB frame of the shipped demo data, 64 x 64 px, reflectance in [0, 1]."""
    with rasterio.open(DEMO_REGION / f"s2_rgb_austria_r0c0_{time}_10km.tif") as src:
        return torch.from_numpy(src.read()[:, :64, :64].astype(np.float32) * 1e-4).clamp(0, 1)


class RealFrames(TinyForecaster):
    """Stores a real persistence forecast (t0 -> t1), so the grid shows a real place and a real error."""

    def validation_step(self, batch, batch_idx):
        input, target = demo_frame("t0")[None], demo_frame("t1")[None]
        self.last_val_images = {"input": input, "target": target, "forecast": input.clone()}


def test_grid_of_a_real_frame_is_not_dark(tmp_path):
    """Reflectance 0.03-0.3 mapped linearly to 0-255 made the grid nearly black (median brightness about 0.09 of
    the picture's non-white pixels); the percentile stretch spreads it."""
    trainer(tmp_path, callbacks=[ForecastImageCallback()], max_epochs=1).fit(RealFrames(), loader(), loader())
    pixels = (
        np.asarray(Image.open(tmp_path / "images" / "epoch_000.png").convert("RGB")).reshape(-1, 3) / 255.0
    )
    drawn = pixels[(pixels < 0.98).any(axis=1)]  # leave out the white background and padding
    assert np.median(drawn.mean(axis=1)) > 0.25


def test_mask_leaves_invalid_pixels_out_of_the_caption_metrics(tmp_path, monkeypatch):
    class WithHole(RealFrames):
        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)
            self.last_val_images["forecast"][..., :20, :] = 1.0  # a white band where the data is invalid
            mask = torch.ones(1, 64, 64, dtype=torch.bool)
            mask[:, :20] = False
            self.last_val_images["mask"] = mask

    logger = WandbLogger(save_dir=tmp_path, offline=True)
    calls = []
    monkeypatch.setattr(logger, "log_image", lambda **kwargs: calls.append(kwargs))
    fit = trainer(tmp_path, logger=logger, callbacks=[ForecastImageCallback()], max_epochs=1)
    fit.fit(WithHole(), loader(), loader())
    caption = calls[-1]["caption"][0]
    input, target, mask = (
        demo_frame("t0")[None],
        demo_frame("t1")[None],
        torch.ones(1, 64, 64, dtype=torch.bool),
    )
    mask[:, :20] = False
    assert calls[-1]["key"] == "val/forecast_grid" and caption.startswith(
        "WithHole validation, epoch 0: sample 0"
    )
    assert f"PSNR {float(psnr(input, target, mask=mask)):.2f} dB" in caption
    assert "GSSIM n/a" in caption  # GSSIM scores fully valid images only


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


def test_save_and_log_image_logs_a_figure_or_png_with_its_caption(tmp_path, monkeypatch):
    logger = WandbLogger(save_dir=tmp_path, offline=True)
    calls = []
    monkeypatch.setattr(logger, "log_image", lambda **kwargs: calls.append(kwargs))
    figure = Figure(figsize=(2, 1))
    figure.subplots().plot([0, 1])
    path = save_and_log_image(
        figure, tmp_path / "rollouts" / "a.png", [logger], key="test/rollout", step=3, caption="PSNR 20.00 dB"
    )
    with Image.open(path) as written:
        assert written.format == "PNG" and written.size == (200, 100)
    assert calls == [{"key": "test/rollout", "images": [str(path)], "step": 3, "caption": ["PSNR 20.00 dB"]}]
    assert save_and_log_image(path, loggers=[logger], key="again") == path
    assert calls[-1]["images"] == [str(path)] and "caption" not in calls[-1]
    with pytest.raises(ValueError, match="needs a path"):
        save_and_log_image(figure, loggers=[logger])
    with pytest.raises(FileNotFoundError, match="no PNG"):
        save_and_log_image(tmp_path / "missing.png")
