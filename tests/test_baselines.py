"""Forecasting baselines: shapes, persistence, training on a toy batch, the shared ForecastTask machinery."""

from __future__ import annotations

import pytest
import rasterio
import torch
from rasterio.crs import CRS

from lightning_modules.baselines import BaselineForecastModule
from lightning_modules.forecast_task import masked_pixel_loss, write_forecast_geotiff
from metrics.functional import mse
from networks.baselines import Persistence, PredRNN, SimVP


def tiny_simvp(in_frames: int = 2) -> SimVP:
    return SimVP(
        in_frames=in_frames,
        hidden_spatial=8,
        hidden_temporal=16,
        num_spatial_layers=2,
        num_temporal_blocks=2,
        kernel_size=7,
        mlp_ratio=2.0,
    )


def tiny_predrnn() -> PredRNN:
    return PredRNN(hidden_channels=8, num_layers=2, kernel_size=3, patch_size=4)


def toy_batch(batch: int = 2, history: int = 2, size: int = 16) -> dict:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(batch, history, 3, size, size, generator=generator)
    target = image[:, -1].roll(1, dims=-1)
    mask = torch.ones(batch, size, size, dtype=torch.bool)
    mask[:, :2] = False
    return {"image": image, "target": target, "mask": mask}


@pytest.mark.parametrize("network", [Persistence(), tiny_simvp(), tiny_predrnn()], ids=type)
def test_networks_map_history_to_next_frame(network):
    image = torch.rand(3, 2, 3, 16, 24)
    assert network(image).shape == (3, 3, 16, 24)


def test_persistence_is_the_last_frame():
    image = torch.rand(2, 3, 3, 8, 8)
    assert torch.equal(Persistence()(image), image[:, -1])
    assert not list(Persistence().parameters())


def test_simvp_rejects_wrong_history_and_size():
    with pytest.raises(ValueError, match="in_frames=2"):
        tiny_simvp()(torch.rand(1, 3, 3, 16, 16))
    with pytest.raises(ValueError, match="divisible by 2"):
        tiny_simvp()(torch.rand(1, 2, 3, 15, 16))


def test_predrnn_leaves_decoupling_loss_in_graph():
    network = tiny_predrnn()
    network(torch.rand(1, 2, 3, 16, 16))
    assert network.aux_loss.requires_grad and network.aux_loss.item() > 0


@pytest.mark.parametrize("make_network", [tiny_simvp, tiny_predrnn], ids=["SimVP", "PredRNN"])
def test_training_loss_decreases_on_toy_batch(make_network):
    torch.manual_seed(0)
    module = BaselineForecastModule(
        make_network(), optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), history=2
    )
    optimizer = module.configure_optimizers()
    batch = toy_batch()
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_persistence_module_has_no_optimizer_and_skips_steps():
    module = BaselineForecastModule(Persistence(), history=2)
    assert module.configure_optimizers() is None
    assert module.training_step(toy_batch(), 0) is None
    assert module.model_name() == "Persistence"


def test_history_mismatch_names_the_key():
    module = BaselineForecastModule(Persistence(), history=3)
    with pytest.raises(ValueError, match="`history`"):
        module.predict_next(toy_batch(history=2)["image"])


def test_masked_loss_ignores_invalid_pixels():
    forecast = torch.zeros(1, 3, 4, 4)
    target = torch.zeros(1, 3, 4, 4)
    forecast[..., 0, :] = 10.0
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[:, 0] = False
    assert masked_pixel_loss(mse, forecast, target, mask).item() == 0.0
    mask[:, 0, 0] = True
    assert masked_pixel_loss(mse, forecast, target, mask).item() == pytest.approx(100.0 / 13)
    nothing = torch.zeros(1, 4, 4, dtype=torch.bool)
    assert masked_pixel_loss(mse, forecast.requires_grad_(), target, nothing).requires_grad


def test_forecasts_are_clamped():
    module = BaselineForecastModule(Persistence(), history=1)
    image = torch.tensor([-1.0, 0.5, 2.0]).view(1, 1, 3, 1, 1)
    assert module.predict_next(image).flatten().tolist() == [0.0, 0.5, 1.0]


def test_geotiff_carries_crs_and_transform(tmp_path):
    crs = CRS.from_epsg(32633)
    transform = (10.0, 0.0, 500000.0, 0.0, -10.0, 5300000.0)
    forecast = torch.rand(3, 8, 12)
    path = tmp_path / "out" / "a.tif"
    write_forecast_geotiff(path, forecast, crs.to_wkt(), transform)
    with rasterio.open(path) as src:
        assert src.crs == crs
        assert tuple(src.transform)[:6] == transform
        assert torch.allclose(torch.from_numpy(src.read()), forecast)
    assert [p.name for p in path.parent.iterdir()] == ["a.tif"]
