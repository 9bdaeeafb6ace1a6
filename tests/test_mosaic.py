"""Whole-scene prediction: scene windows from the history alone, blended into one COG per region and step."""

import errno
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import nn

import callbacks.mosaic as mosaic_module
from callbacks.mosaic import MosaicWriter, feather_weights
from datamodules.s2_timeseries import S2DataError, S2ForecastDataModule
from datamodules.scenes import next_time_key, scene_offsets
from datamodules.synthetic.s2 import DN_SCALE, make_s2_dataset, region_transform, rgb_path, write_raster
from lightning_cli import main
from lightning_modules.baselines import BaselineForecastModule
from networks.baselines import Persistence
from tests.conftest import REPO_ROOT

PATCH = 32
HEIGHT, WIDTH = 70, 90  # not multiples of the window
DESCRIPTIONS = ("B4 red", "B3 green", "B2 blue")
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


class Smoothing(nn.Module):
    """A deterministic conv forecaster whose output depends on the window (zero padding at its borders)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(image[:, -1], 3, stride=1, padding=1, count_include_pad=True)


def scene_data(root: Path, years=(2019, 2020), regions=("alps", "coast"), height=HEIGHT, width=WIDTH) -> Path:
    """Regions (70 x 90 px by default) with band descriptions; the newest year is the last one on disk."""
    make_s2_dataset(root, regions=regions, years=years, embeddings=False, height=height, width=width)
    for region in regions:
        with rasterio.open(rgb_path(root, region, years[-1]), "r+") as dst:
            dst.descriptions = DESCRIPTIONS
    return root


def predict(
    root: Path, out: Path, network: nn.Module, writer: dict | None = None, **data
) -> S2ForecastDataModule:
    data = {"patch_size": PATCH, "batch_size": 4, **data}
    datamodule = S2ForecastDataModule(str(root), reflectance_scale=DN_SCALE, **data)
    callback = MosaicWriter(output_dir=str(out), **(writer or {}))
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        default_root_dir=out.parent / "run",
    )
    assert trainer.predict(BaselineForecastModule(network), datamodule=datamodule) is None
    return datamodule


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def last_frame(root: Path, region: str = "alps", year: int = 2020) -> np.ndarray:
    return read(rgb_path(root, region, year)).astype(np.float32) * np.float32(DN_SCALE)


def test_mosaic_equals_the_window_forecasts_where_windows_do_not_overlap(tmp_path):
    root = scene_data(tmp_path / "data")
    datamodule = predict(root, tmp_path / "out", Smoothing(), predict_overlap=8)
    mosaic = read(tmp_path / "out" / "alps_2021.tif")
    expected = np.zeros_like(mosaic)
    coverage = np.zeros(mosaic.shape[1:], dtype=int)
    dataset = datamodule.predict_dataset
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample["region"] != "alps":
            continue
        row, col = sample["window"].tolist()
        forecast = Smoothing()(sample["image"][None])[0].numpy()
        expected[:, row : row + PATCH, col : col + PATCH] = forecast
        coverage[row : row + PATCH, col : col + PATCH] += 1
    single = coverage == 1
    assert single.sum() > 0.3 * single.size and (coverage >= 2).any()
    np.testing.assert_allclose(mosaic[:, single], expected[:, single], rtol=0, atol=1e-6)


def border_error(tmp_path: Path, overlap: int) -> float:
    """Largest difference between the mosaic and the forecaster run on the whole scene at once."""
    root = tmp_path / "data"
    if not root.exists():
        scene_data(root)
    out = tmp_path / f"out_{overlap}"
    predict(root, out, Smoothing(), predict_overlap=overlap)
    whole = Smoothing()(torch.from_numpy(last_frame(root))[None, None])[0].numpy()
    return float(np.abs(read(out / "alps_2021.tif") - whole).max())


def test_mosaic_is_seamless_across_window_borders(tmp_path):
    hard_tiles, feathered = border_error(tmp_path, 0), border_error(tmp_path, 8)
    assert hard_tiles > 0.01  # the zero padding of each window shows at its borders
    assert feathered < hard_tiles / 5


def test_persistence_mosaic_is_the_last_frame_over_the_whole_scene(tmp_path):
    root = scene_data(tmp_path / "data")
    predict(root, tmp_path / "out", Persistence(), predict_overlap=8)
    mosaic = read(tmp_path / "out" / "coast_2021.tif")
    assert mosaic.shape == (3, HEIGHT, WIDTH) and np.isfinite(mosaic).all()  # fully covered
    np.testing.assert_allclose(mosaic, last_frame(root, "coast"), rtol=0, atol=1e-6)


def test_a_region_with_only_its_history_is_forecast(tmp_path):
    """One year on disk is all a history-1 forecast needs (a training pair would need two)."""
    root = scene_data(tmp_path / "data", years=(2020,))
    predict(root, tmp_path / "out", Persistence())
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tif")) == ["alps_2021.tif", "coast_2021.tif"]
    np.testing.assert_allclose(read(tmp_path / "out" / "alps_2021.tif"), last_frame(root), rtol=0, atol=1e-6)


def test_mosaic_is_a_cloud_optimized_geotiff_with_the_input_grid(tmp_path):
    root = scene_data(tmp_path / "data", regions=("alps",), height=150, width=300)
    predict(root, tmp_path / "out", Persistence(), writer={"blocksize": 128}, patch_size=64, batch_size=16)
    with (
        rasterio.open(tmp_path / "out" / "alps_2021.tif") as src,
        rasterio.open(rgb_path(root, "alps", 2020)) as ref,
    ):
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.profile["tiled"] and src.block_shapes[0] == (128, 128)
        assert src.compression is not None and src.overviews(1)
        assert src.crs == ref.crs and src.transform == ref.transform
        assert src.dtypes[0] == "float32" and np.isnan(src.nodata)
        assert src.descriptions == DESCRIPTIONS
    assert not list((tmp_path / "out").glob(".*")), "work files left behind"


def test_digital_numbers_keep_the_input_type_values_and_nodata(tmp_path):
    root = scene_data(tmp_path / "data")
    path = rgb_path(root, "alps", 2020)
    dn = read(path)
    dn[:, :5, :7] = 0
    write_raster(path, dn, region_transform(0), nodata=0)
    predict(
        root, tmp_path / "out", Persistence(), writer={"output": "digital_numbers"}, max_invalid_fraction=0.5
    )
    with rasterio.open(tmp_path / "out" / "alps_2021.tif") as src:
        assert src.dtypes[0] == "uint16" and src.nodata == 0
        np.testing.assert_array_equal(src.read(), dn)  # persistence: the input's digital numbers back


def test_invalid_history_pixels_are_nodata_in_the_reflectance_mosaic(tmp_path):
    root = scene_data(tmp_path / "data")
    path = rgb_path(root, "alps", 2020)
    dn = read(path)
    dn[:, 10:14, 20:30] = 0
    write_raster(path, dn, region_transform(0), nodata=0)
    predict(root, tmp_path / "out", Persistence())
    mosaic = read(tmp_path / "out" / "alps_2021.tif")
    assert np.isnan(mosaic[:, 10:14, 20:30]).all()
    assert np.isfinite(mosaic).sum() == 3 * (HEIGHT * WIDTH - 40)


def test_horizon_two_writes_one_file_per_forecast_year(tmp_path):
    root = scene_data(tmp_path / "data", years=(2018, 2019, 2020))
    predict(root, tmp_path / "out", Smoothing(), predict_horizon=2)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["alps_2021.tif", "alps_2022.tif", "coast_2021.tif", "coast_2022.tif"]
    first, second = read(tmp_path / "out" / "alps_2021.tif"), read(tmp_path / "out" / "alps_2022.tif")
    twice = Smoothing()(Smoothing()(torch.from_numpy(last_frame(root))[None, None])[None])[0].numpy()
    interior = (slice(None), slice(2, HEIGHT - 2), slice(2, WIDTH - 2))
    assert np.abs(second - first).max() > 1e-3  # the second step forecasts from the first one
    np.testing.assert_allclose(second[interior], twice[interior], rtol=0, atol=0.02)


def test_predict_from_a_folder_without_the_target_year_through_the_cli(tmp_path):
    root = scene_data(tmp_path / "data")
    out = tmp_path / "predictions"
    args = ["predict", "--config", str(REPO_ROOT / "configs" / "tiny" / "persistence.yaml"), *QUIET]
    args += ["--data.init_args.root", str(root), "--data.init_args.time_regex", r"\d{4}"]
    args += ["--data.init_args.patch_size", str(PATCH), "--trainer.default_root_dir", str(tmp_path / "run")]
    args += ["--model.init_args.predict_dir", str(out)]
    main(args)
    assert sorted(p.name for p in out.iterdir()) == ["alps_2021.tif", "coast_2021.tif"]
    np.testing.assert_allclose(read(out / "alps_2021.tif"), last_frame(root), rtol=0, atol=1e-6)


def test_pairs_mode_writes_one_geotiff_per_window(tmp_path):
    root = scene_data(tmp_path / "data")
    predict(root, tmp_path / "out", Persistence(), predict_mode="pairs", val_fraction=0.3, test_fraction=0.3)
    written = list((tmp_path / "out").glob("*.tif"))
    assert written and all(p.name.startswith(("alps_2020_", "coast_2020_")) for p in written)
    with rasterio.open(written[0]) as src:
        assert src.shape == (PATCH, PATCH) and src.count == 3 and src.crs is not None


def test_scene_tiling_covers_any_length_with_an_edge_aligned_last_window():
    assert scene_offsets(70, 32, 8) == [0, 24, 38]
    assert scene_offsets(64, 32, 0) == [0, 32]
    ramp = np.array([0.25, 0.5, 0.75, 1, 1, 0.75, 0.5, 0.25], dtype=np.float32)
    np.testing.assert_array_equal(feather_weights(8, 3), np.outer(ramp, ramp))
    assert (feather_weights(8, 0) == 1).all()


def test_forecast_time_keys_follow_the_last_key():
    assert next_time_key("2020", 1, 1) == "2021"
    assert next_time_key("t9", 2, 1) == "t11"
    assert next_time_key("t09", 1, 1) == "t10"
    assert next_time_key("spring", 1, None) == "spring+1"


@pytest.mark.parametrize(
    ("key", "value"), [("predict_mode", "tiles"), ("predict_overlap", PATCH), ("predict_horizon", 0)]
)
def test_bad_predict_keys_fail_naming_the_key(tmp_path, key, value):
    with pytest.raises(S2DataError, match=key):
        S2ForecastDataModule(str(tmp_path), reflectance_scale=DN_SCALE, patch_size=PATCH, **{key: value})


def test_bad_writer_output_fails_naming_the_key():
    with pytest.raises(ValueError, match="output"):
        MosaicWriter(output="dn")


def test_full_disk_keeps_the_earlier_mosaics_and_leaves_no_half_file(tmp_path, monkeypatch):
    root = scene_data(tmp_path / "data")
    real_copy, copies = rasterio.shutil.copy, []

    def copy_then_fill_disk(source, target, **options):
        copies.append(target)
        if len(copies) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(source, target, **options)

    monkeypatch.setattr(mosaic_module.rasterio.shutil, "copy", copy_then_fill_disk)
    with pytest.raises(OSError, match=r"coast_2021\.tif: .*No space left"):
        predict(root, tmp_path / "out", Persistence())
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["alps_2021.tif"]  # no partial, no work folder
    np.testing.assert_allclose(read(tmp_path / "out" / "alps_2021.tif"), last_frame(root), rtol=0, atol=1e-6)
