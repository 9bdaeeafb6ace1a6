"""Sentinel-2 time-series DataModule: splits, windows, scaling checks, bad files, masks, history, sequences."""

import importlib.util
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch
from lightning.pytorch import LightningModule, Trainer

from datamodules.s2_timeseries import S2DataError, S2ForecastDataModule, collate_s2, grid_offsets
from datamodules.synthetic.s2 import (
    BAD_CASES,
    DN_SCALE,
    HEIGHT,
    REGIONS,
    WIDTH,
    YEARS,
    embedding_path,
    make_bad_case,
    make_s2_dataset,
    region_transform,
    rgb_path,
    write_raster,
)

PATCH = 16
REPO_ROOT = Path(__file__).resolve().parents[1]


def make_dm(root, **overrides) -> S2ForecastDataModule:
    kwargs = {"reflectance_scale": DN_SCALE, "patch_size": PATCH, "batch_size": 2} | overrides
    return S2ForecastDataModule(str(root), **kwargs)


def all_samples(dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


def window_offset(sample) -> tuple[int, int]:
    """(row, col) of a sample's window inside its region, recovered from the window transform."""
    window = rasterio.Affine(*sample["transform"])
    col, row = ~region_transform(REGIONS.index(sample["region"])) @ (window.c, window.f)
    return round(row), round(col)


def test_split_is_by_region_and_seeded(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)
    dm = make_dm(tmp_path, test_fraction=0.2)
    dm.setup("fit")
    dm.setup("test")
    summary = dm.dataset_summary()
    train, val, test = (set(summary[s]["regions"]) for s in ("train", "val", "test"))
    assert train | val | test == set(REGIONS)
    assert not (train & val or train & test or val & test)
    assert {s["region"] for s in all_samples(dm.train_dataset)} <= train
    assert {s["region"] for s in all_samples(dm.val_dataset)} == val
    assert {s["region"] for s in all_samples(dm.test_dataset)} == test

    again = make_dm(tmp_path, test_fraction=0.2)
    again.setup("fit")
    assert again.dataset_summary()["val"]["regions"] == summary["val"]["regions"]
    val_by_seed = set()
    for seed in range(6):
        other = make_dm(tmp_path, seed=seed)
        other.setup("fit")
        val_by_seed.add(tuple(other.dataset_summary()["val"]["regions"]))
    assert len(val_by_seed) > 1


def test_default_split_keeps_test_regions_apart_from_validation(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)
    dm = make_dm(tmp_path)
    dm.setup("fit")
    dm.setup("test")
    summary = dm.dataset_summary()
    train, val, test = (set(summary[s]["regions"]) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (3, 1, 1)
    assert not (train & val or train & test or val & test)
    assert {s["region"] for s in all_samples(dm.test_dataset)} == test


def test_paper_split_warns_that_test_is_validation(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)
    three_way = make_dm(tmp_path)
    three_way.setup("fit")
    dm = make_dm(tmp_path, test_fraction=0)
    with pytest.warns(UserWarning, match="test split the validation regions"):
        dm.setup("fit")
    dm.setup("test")
    summary = dm.dataset_summary()
    assert (
        summary["test"]["regions"]
        == summary["val"]["regions"]
        == three_way.dataset_summary()["val"]["regions"]
    )
    assert len(summary["train"]["regions"]) == 4
    assert len(dm.test_dataset) == len(dm.val_dataset) == 2 * 9


def test_grid_offsets_cover_every_pixel():
    for length in (16, 17, 31, 40, 48, 129):
        covered = np.zeros(length, dtype=bool)
        for start in grid_offsets(length, PATCH):
            assert 0 <= start <= length - PATCH
            covered[start : start + PATCH] = True
        assert covered.all()


def test_grid_windows_cover_the_image_and_match_the_files(tmp_path):
    make_s2_dataset(tmp_path)
    dm = make_dm(tmp_path)
    dm.setup("fit")
    samples = all_samples(dm.val_dataset)
    region = samples[0]["region"]
    covered = np.zeros((HEIGHT, WIDTH), dtype=bool)
    for sample in samples:
        row, col = window_offset(sample)
        covered[row : row + PATCH, col : col + PATCH] = True
        year = int(sample["target_time"])
        with rasterio.open(rgb_path(tmp_path, region, year)) as src:
            raw = src.read(window=((row, row + PATCH), (col, col + PATCH)))
            assert sample["crs"] == src.crs.to_wkt()
        torch.testing.assert_close(
            sample["target"], torch.from_numpy(raw.astype(np.float32) * np.float32(DN_SCALE))
        )
        with rasterio.open(embedding_path(tmp_path, region, year)) as src:
            embedding = src.read(window=((row, row + PATCH), (col, col + PATCH)))
        torch.testing.assert_close(sample["embedding"], torch.from_numpy(embedding))
        assert sample["has_embedding"] and sample["mask"].all()
        assert int(sample["time"]) == year - 1
    assert covered.all()


def test_batches_follow_the_contract(tmp_path):
    make_s2_dataset(tmp_path)
    dm = make_dm(tmp_path, batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 1, 3, PATCH, PATCH) and batch["image"].dtype == torch.float32
    assert batch["target"].shape == (3, 3, PATCH, PATCH)
    assert batch["mask"].shape == (3, PATCH, PATCH) and batch["mask"].dtype == torch.bool
    assert batch["embedding"].shape == (3, 64, PATCH, PATCH)
    assert batch["has_embedding"].dtype == torch.bool and batch["has_embedding"].shape == (3,)
    assert batch["owned"].shape == (3, PATCH, PATCH) and batch["owned"].all()  # crops: every pixel their own
    for key in ("region", "time", "target_time", "crs"):
        assert isinstance(batch[key], list) and all(isinstance(v, str) for v in batch[key])
    assert all(isinstance(t, tuple) and len(t) == 6 for t in batch["transform"])
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def crops(dataset, keys) -> list[tuple]:
    return [dataset[key]["transform"] for key in keys]


def test_random_crops_follow_seed_epoch_and_index_only(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)
    dm = make_dm(tmp_path)
    dm.setup("fit")
    dataset = dm.train_dataset
    indices = range(len(dataset))
    torch.manual_seed(0)
    first = crops(dataset, indices)
    torch.manual_seed(1)  # the global RNG (worker seeds, restarts) plays no part
    assert crops(dataset, indices) == first
    assert crops(dataset, [(0, i) for i in indices]) == first
    assert crops(dataset, reversed(indices)) == first[::-1]  # no state carried from sample to sample
    dataset.set_epoch(1)
    second = crops(dataset, indices)
    assert second != first and crops(dataset, [(1, i) for i in indices]) == second
    other_seed = make_dm(tmp_path, seed=0)
    other_seed.setup("fit")
    other_seed.train_dataset.seed = 5
    assert crops(other_seed.train_dataset, indices) != first
    assert len({window_offset(dataset[i]) for i in indices}) > 9  # crops, not just the grid


def test_crops_do_not_depend_on_the_worker_that_loads_them(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)
    dm = make_dm(tmp_path)
    dm.setup("fit")
    keys = [(3, i) for i in range(len(dm.train_dataset))]

    def load(workers: int) -> list[tuple]:
        loader = torch.utils.data.DataLoader(
            dm.train_dataset, batch_size=4, sampler=keys, num_workers=workers, collate_fn=collate_s2
        )
        return [t for batch in loader for t in batch["transform"]]

    assert load(2) == load(0) == crops(dm.train_dataset, keys)


def test_train_loader_gives_the_dataset_the_trainer_epoch(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)
    dm = make_dm(tmp_path)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(current_epoch=4)
    next(iter(dm.train_dataloader()))
    assert dm.train_dataset.epoch == 4


def test_wrong_scale_is_caught_naming_file_and_key(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)
    with pytest.raises(S2DataError, match="reflectance_scale") as error:
        make_dm(tmp_path, reflectance_scale=1.0).setup("fit")
    assert "s2_rgb_" in str(error.value) and str(tmp_path) in str(error.value)
    with pytest.raises(S2DataError, match="reflectance_scale"):
        make_dm(tmp_path, reflectance_scale=1e-8).setup("fit")


def test_few_saturated_pixels_are_clipped_many_are_rejected(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)
    dm = make_dm(tmp_path)
    dm.setup("fit")
    region = dm.dataset_summary()["val"]["regions"][0]
    path = rgb_path(tmp_path, region, YEARS[-1])
    with rasterio.open(path) as src:
        data, transform = src.read(), src.transform
    data[:, 0, 0] = 12000
    write_raster(path, data, transform)
    dm = make_dm(tmp_path, max_saturated_fraction=0.01)
    dm.setup("fit")
    corner = next(
        s
        for s in all_samples(dm.val_dataset)
        if s["target_time"] == str(YEARS[-1]) and window_offset(s) == (0, 0)
    )
    torch.testing.assert_close(corner["target"][:, 0, 0], torch.ones(3))
    assert corner["target"][:, 1:, 1:].max() < 0.3

    data[:, :10, :] = 12000  # 480 of 1920 pixels
    write_raster(path, data, transform)
    with pytest.raises(S2DataError, match="max_saturated_fraction") as error:
        make_dm(tmp_path, max_saturated_fraction=0.01).setup("fit")
    assert str(path) in str(error.value)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_files_stop_setup_naming_the_file(tmp_path, case):
    bad_file = make_bad_case(tmp_path, case)
    dm = make_dm(tmp_path)
    with pytest.raises(S2DataError) as error:
        dm.setup("fit")
    assert str(bad_file) in str(error.value)


def test_nodata_and_nan_are_masked_and_bad_windows_skipped(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)
    probe = make_dm(tmp_path)
    probe.setup("fit")
    region = probe.dataset_summary()["val"]["regions"][0]  # the split depends on names and seed only
    index = REGIONS.index(region)

    nodata_path = rgb_path(tmp_path, region, 2020)
    with rasterio.open(nodata_path) as src:
        data = src.read()
    data[:, :PATCH, :PATCH] = 0  # the whole window (0, 0)
    data[1, 20, 40:43] = 0  # three pixels of window (16, 32), one band each
    write_raster(nodata_path, data, region_transform(index), nodata=0)

    nan_path = rgb_path(tmp_path, region, 2021)
    with rasterio.open(nan_path) as src:
        floats = src.read().astype(np.float32)
    floats[0, 30, 5] = np.nan  # in windows (16, 0) and (24, 0)
    write_raster(nan_path, floats, region_transform(index))

    dm = make_dm(tmp_path)
    with pytest.warns(UserWarning, match="skipped windows"):
        dm.setup("fit")
    summary = dm.dataset_summary()
    assert summary["val"]["skipped_windows"] == 2  # window (0, 0) of both pairs (each uses 2020)
    assert summary["val"]["windows"] == 2 * 9 - 2
    assert summary["train"]["skipped_windows"] == 0

    samples = {(s["target_time"], window_offset(s)): s for s in all_samples(dm.val_dataset)}
    assert ("2020", (0, 0)) not in samples and ("2021", (0, 0)) not in samples
    nodata_as_target, nodata_as_input = samples[("2020", (16, 32))], samples[("2021", (16, 32))]
    for sample in (nodata_as_target, nodata_as_input):
        assert (~sample["mask"]).sum() == 3 and not sample["mask"][4, 8:11].any()
    assert (nodata_as_target["target"][:, 4, 8:11] == 0).all()
    assert (nodata_as_input["image"][0, :, 4, 8:11] == 0).all()
    for offset in ((16, 0), (24, 0)):
        sample = samples[("2021", offset)]
        row = 30 - offset[0]
        assert (~sample["mask"]).sum() == 1 and not sample["mask"][row, 5]
        assert not torch.isnan(sample["target"]).any() and (sample["target"][:, row, 5] == 0).all()
        assert samples[("2020", offset)]["mask"].all()


@pytest.mark.parametrize("embedding_patch_size", [1, 4])
def test_training_crops_avoid_invalid_areas(tmp_path, embedding_patch_size):
    make_s2_dataset(tmp_path, regions=REGIONS[:2], embeddings=False)
    for region_index, region in enumerate(REGIONS[:2]):
        for year in YEARS:
            path = rgb_path(tmp_path, region, year)
            with rasterio.open(path) as src:
                data = src.read()
            data[:, :, : WIDTH // 2] = 0  # left half is nodata everywhere
            write_raster(path, data, region_transform(region_index), nodata=0)
    dm = make_dm(
        tmp_path,
        val_fraction=0.5,
        test_fraction=0,
        max_invalid_fraction=0.0,
        embedding_patch_size=embedding_patch_size,
    )
    with pytest.warns(UserWarning, match="skipped windows"):
        dm.setup("fit")
    samples = all_samples(dm.train_dataset)
    assert len(samples) == 2 * 3  # 3 fully valid grid windows per pair (right column), 2 pairs
    assert all(s["mask"].all() and window_offset(s)[1] >= WIDTH // 2 for s in samples)


def test_missing_embedding_gives_flag_and_zeros_only_in_mixed_batches(tmp_path):
    make_s2_dataset(tmp_path)
    probe = make_dm(tmp_path)
    probe.setup("fit")
    region = probe.dataset_summary()["val"]["regions"][0]
    embedding_path(tmp_path, region, 2021).unlink()
    dm = make_dm(tmp_path)
    dm.setup("fit")
    samples = all_samples(dm.val_dataset)
    for sample in samples:
        has = sample["target_time"] != "2021"
        assert bool(sample["has_embedding"]) == has
        assert ("embedding" in sample) == has
    batch = collate_s2(samples[:2] + samples[-2:])
    assert batch["has_embedding"].tolist() == [True, True, False, False]
    assert (batch["embedding"][:2] != 0).any() and (batch["embedding"][2:] == 0).all()
    assert "embedding" not in collate_s2(samples[-2:])


def test_without_embedding_files_no_placeholder_is_built(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)
    dm = make_dm(tmp_path)
    dm.setup("fit")
    assert not dm.train_dataset.has_embeddings
    batch = next(iter(dm.train_dataloader()))
    assert "embedding" not in batch and not batch["has_embedding"].any()


def test_history_two(tmp_path):
    years = (2018, 2019, 2020, 2021)
    make_s2_dataset(tmp_path, years=years, embeddings=False)
    dm = make_dm(tmp_path, history=2)
    dm.setup("fit")
    assert dm.dataset_summary()["val"]["pairs"] == 2
    region = dm.dataset_summary()["val"]["regions"][0]
    sample = next(s for s in all_samples(dm.val_dataset) if s["target_time"] == "2021")
    assert sample["image"].shape == (2, 3, PATCH, PATCH) and sample["time"] == "2020"
    row, col = window_offset(sample)
    for frame, year in enumerate((2019, 2020)):
        with rasterio.open(rgb_path(tmp_path, region, year)) as src:
            raw = src.read(window=((row, row + PATCH), (col, col + PATCH))).astype(np.float32)
        torch.testing.assert_close(sample["image"][frame], torch.from_numpy(raw * np.float32(DN_SCALE)))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 2, 3, PATCH, PATCH)


def test_region_with_one_year_is_left_out_with_warning(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)
    make_s2_dataset(tmp_path / "extra", regions=("lonely",), years=(2020,), embeddings=False)
    (tmp_path / "extra" / "lonely").rename(tmp_path / "lonely")
    (tmp_path / "extra").rmdir()
    dm = make_dm(tmp_path)
    with pytest.warns(UserWarning, match="region lonely"):
        dm.setup("fit")
    summary = dm.dataset_summary()
    assert summary["excluded_regions"] == ["lonely"]
    assert all("lonely" not in summary[s]["regions"] for s in ("train", "val", "test"))


def test_empty_split_raises_naming_the_split(tmp_path):
    make_s2_dataset(tmp_path, regions=REGIONS[:1], embeddings=False)
    with pytest.raises(S2DataError, match="split 'train' is empty"):
        make_dm(tmp_path).setup("fit")
    make_s2_dataset(tmp_path, regions=REGIONS[:3], embeddings=False)
    with pytest.raises(S2DataError, match="batch_size=19"):
        make_dm(tmp_path, batch_size=19).setup("fit")  # 1 train region: 2 pairs x 9 windows
    with pytest.raises(S2DataError, match="config key root"):
        make_dm(tmp_path / "missing").setup("fit")
    with pytest.warns(UserWarning, match="time_regex"), pytest.raises(S2DataError, match="no usable region"):
        make_dm(tmp_path, time_regex=r"t\d+").setup("fit")


def test_sequence_mode_yields_whole_series(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)
    dm = make_dm(tmp_path, sequence=True, predict_mode="pairs")
    dm.setup("test")
    region = dm.dataset_summary()["test"]["regions"][0]
    assert len(dm.test_dataset) == 9
    batch = next(iter(dm.test_dataloader()))
    assert batch["images"].shape == (1, len(YEARS), 3, PATCH, PATCH)
    assert batch["mask"].shape == (1, len(YEARS), PATCH, PATCH)
    assert batch["times"] == [[str(y) for y in YEARS]] and batch["region"] == [region]
    with rasterio.open(rgb_path(tmp_path, region, YEARS[0])) as src:
        raw = src.read(window=((0, PATCH), (0, PATCH))).astype(np.float32)
    torch.testing.assert_close(batch["images"][0, 0], torch.from_numpy(raw * np.float32(DN_SCALE)))
    dm.setup("predict")
    assert len(dm.predict_dataset) == 9


def test_holdout_last_step(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)
    dm = make_dm(tmp_path, holdout_last_step=True, test_fraction=0)
    dm.setup("fit")
    dm.setup("test")
    summary = dm.dataset_summary()
    assert summary["test"]["regions"] == sorted(REGIONS) and summary["test"]["pairs"] == len(REGIONS)
    assert summary["train"]["pairs"] + summary["val"]["pairs"] == len(REGIONS)
    last = str(YEARS[-1])
    assert all(s["target_time"] == last for s in all_samples(dm.test_dataset))
    assert all(s["target_time"] != last for s in all_samples(dm.val_dataset))
    torch.manual_seed(0)
    assert all(s["target_time"] != last for s in all_samples(dm.train_dataset))
    with pytest.raises(S2DataError, match="test_fraction: 0"):
        make_dm(tmp_path, holdout_last_step=True)


def test_holdout_last_step_rollouts_are_rejected(tmp_path):
    with pytest.raises(S2DataError, match="holdout_last_step and sequence"):
        make_dm(tmp_path, holdout_last_step=True, test_fraction=0, sequence=True)


def test_trainer_receives_unnormalised_reflectance(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)

    class Probe(LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.maxima = []

        def training_step(self, batch, batch_idx):
            self.maxima.append(float(batch["image"].max()))
            return (self.weight - batch["target"].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(probe, datamodule=make_dm(tmp_path))
    assert len(probe.maxima) == 2 and all(0.2 < m <= 0.3 for m in probe.maxima)


def test_demo_data_loads(tmp_path):
    dm = S2ForecastDataModule(
        str(REPO_ROOT / "data" / "demo"),
        reflectance_scale=1e-4,
        patch_size=64,
        time_regex=r"t\d+",
        cache_dir=str(tmp_path),
    )
    dm.setup("fit")
    summary = dm.dataset_summary()
    assert [len(summary[s]["regions"]) for s in ("train", "val", "test")] == [4, 1, 1]
    sample = dm.val_dataset[0]
    assert (sample["time"], sample["target_time"]) == ("t0", "t1") and not sample["has_embedding"]
    assert "32633" in sample["crs"]


def test_demo_converter_keeps_pixels_and_grid(tmp_path, shared_data):
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO_ROOT / "tools" / "make_demo_data.py")
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    source = shared_data / "ftw-austria-s2" / "inference-img.tif"
    written = converter.convert(source, tmp_path)
    assert len(written) == 12
    with rasterio.open(source) as src:
        full, crs, source_transform = src.read(), src.crs, src.transform
    with rasterio.open(tmp_path / "austria_r1c2" / "s2_rgb_austria_r1c2_t1_10km.tif") as tile:
        col, row = ~source_transform @ (tile.transform.c, tile.transform.f)
        row, col = round(row), round(col)
        assert (row + tile.height, col + tile.width) == full.shape[1:] and tile.crs == crs
        np.testing.assert_array_equal(tile.read(), full[4:7, row:, col:])


# ----- consecutive steps, manifest, bright pixels, offset, ownership ------------------------------------------
def test_gap_years_are_not_paired(tmp_path):
    make_s2_dataset(tmp_path, years=(2018, 2020, 2021), embeddings=False)
    dm = make_dm(tmp_path)
    with pytest.warns(UserWarning, match="pairs across a gap of more than time_step=1 dropped"):
        dm.setup("fit")
    summary = dm.dataset_summary()
    assert summary["val"]["pairs"] == 1 and summary["val"]["gap_pairs"] == 1
    assert summary["train"]["gap_pairs"] == len(summary["train"]["regions"])
    assert {(s["time"], s["target_time"]) for s in all_samples(dm.val_dataset)} == {("2020", "2021")}
    dm.setup("test")
    rollouts = make_dm(tmp_path, sequence=True)
    with pytest.warns(UserWarning, match="pairs across a gap"):
        rollouts.setup("test")
    assert {tuple(rollouts.test_dataset[i]["times"]) for i in range(len(rollouts.test_dataset))} == {
        ("2020", "2021")
    }
    unchecked = make_dm(tmp_path, time_step=None)
    unchecked.setup("fit")
    assert unchecked.dataset_summary()["val"]["pairs"] == 2


def test_time_keys_without_numbers_need_time_step_off(tmp_path):
    for region_index, region in enumerate(REGIONS[:3]):
        for key in ("spring", "summer"):
            path = tmp_path / region / f"s2_rgb_{region}_{key}_10km.tif"
            write_raster(path, np.full((3, HEIGHT, WIDTH), 1000, np.uint16), region_transform(region_index))
    with pytest.raises(S2DataError, match="time_step"):
        make_dm(tmp_path, time_regex="[a-z]+").setup("fit")
    dm = make_dm(tmp_path, time_regex="[a-z]+", time_step=None)
    dm.setup("fit")
    assert dm.dataset_summary()["val"]["pairs"] == 1


def forbid_pixel_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a file was read again although the manifest has it")

    monkeypatch.setattr("datamodules.s2_timeseries.scan_file", refuse)


def test_manifest_skips_reading_unchanged_files(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_s2_dataset(data)
    first = make_dm(data, cache_dir=str(cache))
    first.prepare_data()
    assert (cache / ".s2_validation_manifest.json").is_file()
    with monkeypatch.context() as patch:
        forbid_pixel_reads(patch)
        second = make_dm(data, cache_dir=str(cache))
        second.setup("fit")
        second.setup("test")
    first.setup("fit")
    assert second.dataset_summary() == first.dataset_summary()
    sample_first, sample_second = first.val_dataset[3], second.val_dataset[3]
    torch.testing.assert_close(sample_first["mask"], sample_second["mask"])

    region = first.dataset_summary()["val"]["regions"][0]
    changed = rgb_path(data, region, 2021)
    with rasterio.open(changed) as src:
        pixels = src.read()
    pixels[:, :PATCH, :PATCH] = 0
    write_raster(changed, pixels, region_transform(REGIONS.index(region)), nodata=0)
    scanned = []
    original = __import__("datamodules.s2_timeseries", fromlist=["scan_file"]).scan_file
    monkeypatch.setattr(
        "datamodules.s2_timeseries.scan_file",
        lambda path, *a, **k: scanned.append(path) or original(path, *a, **k),
    )
    third = make_dm(data, cache_dir=str(cache))
    with pytest.warns(UserWarning, match="skipped windows"):
        third.setup("fit")
    assert scanned == [changed]
    assert third.dataset_summary()["val"]["skipped_windows"] == 1
    scanned.clear()
    with pytest.warns(UserWarning, match="skipped windows"):  # other scale: statistics redone
        make_dm(data, cache_dir=str(cache), reflectance_scale=2e-4).setup("fit")
    assert len(scanned) == len(REGIONS) * len(YEARS)


def test_manifest_keeps_reporting_bad_files(tmp_path, monkeypatch):
    bad_file = make_bad_case(tmp_path, "rgb_band_count")
    with pytest.raises(S2DataError, match="bands"):
        make_dm(tmp_path).setup("fit")
    forbid_pixel_reads(monkeypatch)
    with pytest.raises(S2DataError, match="bands") as error:
        make_dm(tmp_path).setup("fit")
    assert str(bad_file) in str(error.value)


def brighten(path: Path, fraction_rows: int, value: int = 12000) -> None:
    with rasterio.open(path) as src:
        data, transform = src.read(), src.transform
    data[:, :fraction_rows, :] = value
    write_raster(path, data, transform)


def test_bright_clouds_are_clipped_and_counted_misscaled_files_still_stop(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)
    path = rgb_path(tmp_path, REGIONS[0], YEARS[0])
    brighten(path, 1)  # one row of 40: 2.5% of the pixels above reflectance 1 (L1C clouds)
    dm = make_dm(tmp_path)
    dm.setup("fit")
    assert dm.dataset_summary()["clipped_files"] == {str(path): pytest.approx(1 / HEIGHT)}
    with pytest.raises(S2DataError, match="max_saturated_fraction=0.01"):
        make_dm(tmp_path, max_saturated_fraction=0.01).setup("fit")
    make_s2_dataset(tmp_path / "raw", regions=REGIONS[:3], embeddings=False)
    with pytest.raises(S2DataError, match="mis-scaled") as error:
        make_dm(tmp_path / "raw", reflectance_scale=1.0, max_saturated_fraction=1.0).setup("fit")
    assert "s2_rgb_" in str(error.value)


def test_reflectance_offset_of_processing_baseline_4(tmp_path):
    make_s2_dataset(tmp_path / "plain", regions=REGIONS[:3], embeddings=False)
    make_s2_dataset(tmp_path / "offset", regions=REGIONS[:3], embeddings=False)
    for region_index, region in enumerate(REGIONS[:3]):
        for year in YEARS:
            path = rgb_path(tmp_path / "offset", region, year)
            with rasterio.open(path) as src:
                data = src.read()
            write_raster(path, data + np.uint16(1000), region_transform(region_index))
    plain = make_dm(tmp_path / "plain")
    shifted = make_dm(tmp_path / "offset", reflectance_offset=-1000)
    for dm in (plain, shifted):
        dm.setup("fit")
    torch.testing.assert_close(shifted.val_dataset[0]["target"], plain.val_dataset[0]["target"])
    unshifted = make_dm(tmp_path / "offset")
    unshifted.setup("fit")
    assert (unshifted.val_dataset[0]["target"] - plain.val_dataset[0]["target"]).mean() == pytest.approx(0.1)


def test_grid_windows_own_every_pixel_once(tmp_path):
    make_s2_dataset(tmp_path, embeddings=False)  # 40 x 48 px: windows at rows 0, 16, 24 and cols 0, 16, 32
    dm = make_dm(tmp_path, sequence=True)
    dm.setup("fit")
    dm.setup("test")
    for dataset, per_pixel in ((dm.val_dataset, 2), (dm.test_dataset, 1)):  # val: 2 pairs, test: 1 sequence
        owned = np.zeros((HEIGHT, WIDTH), dtype=int)
        for sample in all_samples(dataset):
            row, col = window_offset(sample)
            owned[row : row + PATCH, col : col + PATCH] += sample["owned"].numpy()
        assert (owned == per_pixel).all()


def write_nan_embedding_pixels(root: Path, region: str, year: int, pixels: list[tuple[int, int]]) -> None:
    path = embedding_path(root, region, year)
    with rasterio.open(path) as src:
        embedding = src.read()
    for row, col in pixels:
        embedding[7, row, col] = np.nan
    write_raster(path, embedding, region_transform(REGIONS.index(region)))


def test_pooled_embedding_equals_pooling_the_full_window(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_s2_dataset(data, height=42)  # grid rows 0, 16, 26: the edge row 26 is off the 4 px lattice
    probe = make_dm(data, cache_dir=str(tmp_path / "probe"))
    probe.setup("fit")
    region = probe.dataset_summary()["val"]["regions"][0]
    write_nan_embedding_pixels(data, region, 2021, [(3, 5), (30, 40)])
    per_pixel = make_dm(data, cache_dir=str(tmp_path / "per_pixel"))
    pooled = make_dm(data, cache_dir=str(tmp_path / "pooled"), embedding_patch_size=4)
    for dm in (per_pixel, pooled):
        dm.setup("fit")
    written = sorted((tmp_path / "pooled" / ".s2_pooled_embeddings").rglob("*.pool4.npy"))
    assert len(written) == len(REGIONS) * len(YEARS)
    full_reads = []
    read_embedding = pooled.reader.read_embedding
    monkeypatch.setattr(
        pooled.reader,
        "read_embedding",
        lambda path, row, col, size: full_reads.append((row, col)) or read_embedding(path, row, col, size),
    )
    for full, sample in zip(all_samples(per_pixel.val_dataset), all_samples(pooled.val_dataset), strict=True):
        assert sample["embedding"].shape == (64, PATCH // 4, PATCH // 4)
        # the model's pooling of a full-resolution window
        expected = torch.nn.functional.avg_pool2d(full["embedding"], 4)
        torch.testing.assert_close(sample["embedding"], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sample["mask"], full["mask"])
    masked = [s for s in all_samples(pooled.val_dataset) if not s["mask"].all()]
    assert {(s["target_time"], window_offset(s)) for s in masked} == {
        ("2021", (0, 0)),
        ("2021", (16, 32)),
        ("2021", (26, 32)),
    }
    assert full_reads and {row for row, _ in full_reads} == {26}  # lattice windows come from the pooled copy


def test_pooled_training_crops_start_on_the_patch_lattice(tmp_path):
    make_s2_dataset(tmp_path)
    dm = make_dm(tmp_path, embedding_patch_size=4)
    dm.setup("fit")
    offsets = [window_offset(s) for s in all_samples(dm.train_dataset)]
    assert all(row % 4 == 0 and col % 4 == 0 for row, col in offsets)
    assert len(set(offsets)) > 9  # crops, not just the grid
    batch = next(iter(dm.train_dataloader()))
    assert batch["embedding"].shape == (2, 64, PATCH // 4, PATCH // 4) and batch["has_embedding"].all()


def test_a_deleted_pooled_copy_is_written_again(tmp_path):
    make_s2_dataset(tmp_path, regions=REGIONS[:3])
    make_dm(tmp_path, embedding_patch_size=4).setup("fit")
    copy = next((tmp_path / ".s2_pooled_embeddings").rglob("*.npy"))
    expected = np.load(copy)
    copy.unlink()
    make_dm(tmp_path, embedding_patch_size=4).setup("fit")
    np.testing.assert_array_equal(np.load(copy), expected)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("batch_size", 0),
        ("batch_size", -2),
        ("patch_size", 0),
        ("patch_size", -16),
        ("num_workers", -1),
        ("embedding_patch_size", 0),
        ("embedding_patch_size", 3),  # does not divide patch_size 64
    ],
)
def test_bad_loader_key_is_the_last_line_naming_it(tmp_path, capsys, key, value):
    from lightning_cli import main

    args = ["--config", str(REPO_ROOT / "configs" / "tiny" / "simvp.yaml")]
    args += ["--data.init_args.root", str(REPO_ROOT / "data" / "demo"), f"--data.init_args.{key}={value}"]
    args += ["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(args, run=False)
    assert exit_info.value.code != 0
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and f"data.init_args.{key}" in last_line
    assert f"{value}" in last_line.split(f"data.init_args.{key}", 1)[1]
    assert len(last_line) < 200
