"""GEO-Bench DataModule: read the benchmark's own HDF5/JSON/pickle files, batches per the DiFuser contract."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser

from datamodules.geobench import (
    GeoBenchDataModule,
    InertObject,
    UnsafePickleError,
    decode_attrs_pickle,
    safe_unpickle,
)
from datamodules.synthetic import geobench as make_geobench


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """m-eurosat and m-cashew-plant (synthetic pixels); read-only for the tests below."""
    root = tmp_path_factory.mktemp("geobench")
    make_geobench.write_eurosat(root)
    make_geobench.write_cashew_plant(root)
    return root


@pytest.fixture()
def bench_copy(bench: Path, tmp_path: Path) -> Path:
    """A private copy for tests that damage files."""
    return Path(shutil.copytree(bench, tmp_path / "geobench"))


def eurosat_dir(root: Path) -> Path:
    return root / "classification_v1.0" / "m-eurosat"


def cashew_dir(root: Path) -> Path:
    return root / "segmentation_v1.0" / "m-cashew-plant"


def batch_of(dm: GeoBenchDataModule, split: str = "train") -> dict:
    dataset = {"train": dm.train_dataset, "val": dm.val_dataset, "test": dm.test_dataset}[split]
    return torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])


def test_bigearthnet_real_patches_multilabel(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "bigearthnet-s2-examples"
    make_geobench.write_bigearthnet(tmp_path, source)
    dm = GeoBenchDataModule(task="m-bigearthnet", root=str(tmp_path), batch_size=2)
    assert dm.task_type == "multilabel"
    assert dm.num_classes == 43 and dm.class_names[11] == "Non-irrigated arable land"
    assert dm.band_names == ["04 - Red", "03 - Green", "02 - Blue"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 120, 120) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].shape == (2, 43) and batch["label"].dtype == torch.float32
    for name, label in zip(batch["sample"], batch["label"], strict=True):
        truth = json.loads((source / name / f"{name}_labels_metadata.json").read_text())["labels"]
        assert sorted(dm.class_names[i] for i in torch.nonzero(label).flatten()) == sorted(truth)


def test_bigearthnet_mixed_resolution_bands_resized_to_finest(shared_data: Path, tmp_path: Path) -> None:
    make_geobench.write_bigearthnet(tmp_path, shared_data / "bigearthnet-s2-examples")
    dm = GeoBenchDataModule(
        task="m-bigearthnet", root=str(tmp_path), bands=["01", "8A", "NIR"], image_size=64
    )
    assert dm.band_names == ["01 - Coastal aerosol", "08A - Vegetation Red Edge", "08 - NIR"]
    dm.setup("test")
    item = dm.test_dataset[0]
    assert item["image"].shape == (3, 64, 64)
    native = GeoBenchDataModule(task="m-bigearthnet", root=str(tmp_path), bands=["01", "8A", "NIR"])
    native.setup("test")
    assert native.test_dataset[0]["image"].shape == (3, 120, 120)  # 20 px and 60 px bands upsampled


def test_classification_batch_matches_files_and_minmax(bench: Path) -> None:
    dm = GeoBenchDataModule(task="m-eurosat", root=str(bench), normalization="minmax")
    assert (dm.task_type, dm.num_classes, dm.class_names[:2]) == (
        "classification",
        10,
        ["Annual Crop", "Forest"],
    )
    assert len(dm.available_bands) == 13
    dm.setup("fit")
    batch = batch_of(dm)
    assert batch["image"].shape == (4, 3, 16, 16) and batch["label"].dtype == torch.int64
    label_map = json.loads((eurosat_dir(bench) / "label_map.json").read_text())
    truth = {name: int(label) for label, names in label_map.items() for name in names}
    assert batch["label"].tolist() == [truth[name] for name in batch["sample"]]
    stats = json.loads((eurosat_dir(bench) / "band_stats.json").read_text())["03 - Green"]
    with h5py.File(eurosat_dir(bench) / f"{batch['sample'][0]}.hdf5") as file:
        raw = file["03 - Green"][()].astype(np.float32)
    expected = np.clip((raw - stats["min"]) / (stats["max"] - stats["min"]), 0, 1)
    np.testing.assert_allclose(batch["image"][0, 1].numpy(), expected, rtol=1e-5, atol=1e-6)
    # train-split stats: the train images span [0, 1] exactly
    assert batch["image"].min() == 0.0 and batch["image"].max() == 1.0


def test_meanstd_band_subset_and_bilinear_resize(bench: Path) -> None:
    dm = GeoBenchDataModule(
        task="m-eurosat", root=str(bench), bands=["NIR", "red"], normalization="meanstd", image_size=8
    )
    assert dm.band_names == ["08 - NIR", "04 - Red"]
    dm.setup("validate")
    item = dm.val_dataset[0]
    assert item["image"].shape == (2, 8, 8)
    stats = json.loads((eurosat_dir(bench) / "band_stats.json").read_text())["04 - Red"]
    with h5py.File(eurosat_dir(bench) / f"{item['sample']}.hdf5") as file:
        raw = torch.from_numpy(file["04 - Red"][()].astype(np.float32))
    resized = torch.nn.functional.interpolate(raw[None, None], size=(8, 8), mode="bilinear", antialias=True)[
        0, 0
    ]
    torch.testing.assert_close(item["image"][1], (resized - stats["mean"]) / stats["std"])
    assert dm.dataset_key != GeoBenchDataModule(task="m-eurosat", root=str(bench)).dataset_key


def test_train_fraction_uses_partition_file(bench: Path) -> None:
    full = GeoBenchDataModule(task="m-eurosat", root=str(bench))
    half = GeoBenchDataModule(task="m-eurosat", root=str(bench), train_fraction=0.5)
    full.setup("fit")
    half.setup("fit")
    partition = json.loads((eurosat_dir(bench) / "0.50x_train_partition.json").read_text())
    assert [r.name for r in half.train_dataset.records] == partition["train"]
    assert len(half.train_dataset) == 2 and len(full.train_dataset) == 4
    assert [r.name for r in half.val_dataset.records] == [r.name for r in full.val_dataset.records]
    with pytest.raises(FileNotFoundError, match=r"0\.10x_train_partition\.json.*'train_fraction'"):
        GeoBenchDataModule(task="m-eurosat", root=str(bench), train_fraction=0.1)


def test_segmentation_mask_nearest_resize_and_ignore_index(bench: Path) -> None:
    dm = GeoBenchDataModule(task="m-cashew-plant", root=str(bench), image_size=32, ignore_index=100)
    assert (dm.task_type, dm.num_classes, dm.class_names[0]) == ("segmentation", 7, "no data")
    dm.setup("test")
    item = dm.test_dataset[0]
    assert item["image"].shape == (3, 32, 32) and item["label"].shape == (32, 32)
    assert item["label"].dtype == torch.int64
    with h5py.File(cashew_dir(bench) / f"{item['sample']}.hdf5") as file:
        mask = torch.from_numpy(file["label"][()].astype(np.int64))
    assert (mask == make_geobench.OUT_OF_CLASS_MASK_VALUE).any()
    mask[mask >= 7] = 100
    torch.testing.assert_close(item["label"], mask.repeat_interleave(2, 0).repeat_interleave(2, 1))
    default = GeoBenchDataModule(task="m-cashew-plant", root=str(bench))
    default.setup("test")
    assert set(default.test_dataset[0]["label"].unique().tolist()) <= set(range(7)) | {255}
    assert 255 in default.test_dataset[0]["label"]


def test_unknown_band_lists_available(bench: Path) -> None:
    with pytest.raises(ValueError, match=r"'B99'.*'bands'.*'04 - Red'"):
        GeoBenchDataModule(task="m-eurosat", root=str(bench), bands=["B99"])


def test_missing_root_and_task_name_path_and_keys(bench: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="'root'"):
        GeoBenchDataModule(task="m-eurosat", root=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=r"m-so2sat.*'root', 'task'"):
        GeoBenchDataModule(task="m-so2sat", root=str(bench))


def test_missing_band_stats_names_file(bench_copy: Path) -> None:
    (eurosat_dir(bench_copy) / "band_stats.json").unlink()
    with pytest.raises(FileNotFoundError, match="band_stats.json"):
        GeoBenchDataModule(task="m-eurosat", root=str(bench_copy))


def test_truncated_hdf5_names_file_at_setup(bench_copy: Path) -> None:
    path = eurosat_dir(bench_copy) / "id_00004.hdf5"  # the valid split
    path.write_bytes(path.read_bytes()[:300])
    dm = GeoBenchDataModule(task="m-eurosat", root=str(bench_copy))
    with pytest.raises(ValueError, match=r"id_00004\.hdf5.*corrupt or truncated"):
        dm.setup("fit")


def test_missing_sample_file_names_file(bench_copy: Path) -> None:
    (eurosat_dir(bench_copy) / "id_00001.hdf5").unlink()
    with pytest.raises(FileNotFoundError, match=r"id_00001\.hdf5"):
        GeoBenchDataModule(task="m-eurosat", root=str(bench_copy)).setup("fit")


def test_missing_band_in_sample_names_file_and_band(bench_copy: Path) -> None:
    with h5py.File(eurosat_dir(bench_copy) / "id_00005.hdf5", "a") as file:
        del file["02 - Blue"]
    with pytest.raises(ValueError, match=r"id_00005\.hdf5 lacks band '02 - Blue'"):
        GeoBenchDataModule(task="m-eurosat", root=str(bench_copy)).setup("test")


def test_nan_pixels_name_file(bench_copy: Path) -> None:
    with h5py.File(cashew_dir(bench_copy) / "sample_2.hdf5", "a") as file:
        file["03 - Green_2019-11-15"][3, 3] = np.nan
    with pytest.raises(ValueError, match=r"sample_2\.hdf5.*NaN/Inf"):
        GeoBenchDataModule(task="m-cashew-plant", root=str(bench_copy)).setup("fit")


def test_empty_split_names_split_and_partition(bench_copy: Path) -> None:
    path = eurosat_dir(bench_copy) / "default_partition.json"
    partition = json.loads(path.read_text())
    path.write_text(json.dumps({**partition, "valid": []}))
    with pytest.raises(ValueError, match=r"'valid'.*default_partition\.json.*empty"):
        GeoBenchDataModule(task="m-eurosat", root=str(bench_copy)).setup("validate")


def test_out_of_range_class_label_names_file(bench_copy: Path) -> None:
    path = eurosat_dir(bench_copy) / "id_00000.hdf5"
    with h5py.File(path, "a") as file:
        file.attrs["pickle"] = str(pickle.dumps({"label": 12}))
    with pytest.raises(ValueError, match=r"id_00000\.hdf5: label 12"):
        GeoBenchDataModule(task="m-eurosat", root=str(bench_copy)).setup("fit")


class RunsShell:
    """A pickle payload that would run a shell command when unpickled by plain pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_unpickler_refuses_callables(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafePickleError, match="system"):
        safe_unpickle(pickle.dumps(RunsShell(marker)))
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="eval"):
        safe_unpickle(pickle.dumps(eval))
    with pytest.raises(UnsafePickleError, match="object dtypes"):
        safe_unpickle(pickle.dumps(np.array([1, "a"], dtype=object)))


def test_safe_unpickler_reads_format_data_without_geobench() -> None:
    specs = make_geobench.pickle_format(
        {
            "info": make_geobench.sentinel2_info("B04"),
            "label": np.int64(4),
            "hot": np.array([0, 1], dtype=np.int64),
        }
    )
    data = safe_unpickle(specs)
    assert isinstance(data["info"], InertObject) and data["info"].pickled_name == "Sentinel2"
    assert data["info"].get("name") == "04 - Red" and data["info"].get("alt_names") == ("4", "04", "red")
    assert data["label"] == 4 and data["hot"].tolist() == [0, 1]
    assert decode_attrs_pickle(str(specs))["label"] == 4


def test_malicious_sample_pickle_rejected_at_setup(bench_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with h5py.File(eurosat_dir(bench_copy) / "id_00002.hdf5", "a") as file:
        file.attrs["pickle"] = str(pickle.dumps({"label": RunsShell(marker)}))
    with pytest.raises(ValueError, match=r"id_00002\.hdf5.*cannot be read safely.*system"):
        GeoBenchDataModule(task="m-eurosat", root=str(bench_copy)).setup("fit")
    assert not marker.exists()


def test_malicious_task_specs_rejected_at_construction(bench_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (eurosat_dir(bench_copy) / "task_specs.pkl").write_bytes(pickle.dumps(RunsShell(marker)))
    with pytest.raises(ValueError, match=r"task_specs\.pkl.*system"):
        GeoBenchDataModule(task="m-eurosat", root=str(bench_copy))
    assert not marker.exists()


def test_config_keys_parse_with_jsonargparse(bench: Path) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(GeoBenchDataModule, "data")
    config = parser.parse_args(
        [
            "--data.task=m-eurosat",
            f"--data.root={bench}",
            "--data.bands=[nir]",
            "--data.normalization=meanstd",
        ]
    )
    dm = parser.instantiate(config).data
    assert dm.band_names == ["08 - NIR"] and dm.normalization == "meanstd" and dm.batch_size == 32
    with pytest.raises(Exception, match="normalization"):
        parser.parse_args(["--data.task=m-eurosat", f"--data.root={bench}", "--data.normalization=zscore"])


def rgb_fraction_at_bounds(image: torch.Tensor) -> float:
    return float(((image == 0) | (image == 1)).float().mean())


def test_default_normalization_gives_real_sentinel2_pixels_a_natural_range(
    shared_data: Path, tmp_path
) -> None:
    """Real BigEarthNet patches, band_stats.json over every patch (its maxima come from the snow scene, as the
    saturated outliers of a real benchmark's stats): the default input is neither black nor mostly clipped."""
    make_geobench.write_bigearthnet(tmp_path, shared_data / "bigearthnet-s2-examples", stats_over="all")
    dm = GeoBenchDataModule(task="m-bigearthnet", root=str(tmp_path))
    dm.setup("fit")
    image = batch_of(dm)["image"]
    assert 0.1 < float(image.mean()) < 0.6
    assert rgb_fraction_at_bounds(image) < 0.02
    record = dm.train_dataset.records[0]
    with h5py.File(record.path) as f:
        red = torch.from_numpy(f[record.band_keys[0]][()].astype(np.float32))
    torch.testing.assert_close(
        dm.train_dataset[0]["image"][0], (red / 4095).clamp(0, 1)
    )  # fixed Sentinel-2 scale
    minmax = GeoBenchDataModule(task="m-bigearthnet", root=str(tmp_path), normalization="minmax")
    minmax.setup("fit")
    assert float(batch_of(minmax)["image"].mean()) < 0.1  # what the stats' outlier maxima do


def test_percentile_stretch_reads_band_stats_percentiles(shared_data: Path, tmp_path) -> None:
    make_geobench.write_bigearthnet(tmp_path, shared_data / "bigearthnet-s2-examples")
    task_dir = tmp_path / "classification_v1.0" / "m-bigearthnet"
    stats = json.loads((task_dir / "band_stats.json").read_text())["03 - Green"]
    for percentiles, (low, high) in {
        "0.1-99.9": ("percentile_0_1", "percentile_99_9"),
        "1-99": ("percentile_1", "percentile_99"),
    }.items():
        dm = GeoBenchDataModule(
            task="m-bigearthnet", root=str(tmp_path), normalization="percentile", percentiles=percentiles
        )
        dm.setup("fit")
        item = dm.train_dataset[0]
        record = dm.train_dataset.records[0]
        with h5py.File(record.path) as f:
            green = torch.from_numpy(f[record.band_keys[1]][()].astype(np.float32))
        expected = ((green - stats[low]) / (stats[high] - stats[low])).clamp(0, 1)
        torch.testing.assert_close(item["image"][1], expected)
        image = batch_of(dm)["image"]
        assert 0.1 < float(image.mean()) < 0.6  # stats of the train split only: percentiles of land scenes
        assert rgb_fraction_at_bounds(image) < (0.02 if percentiles == "0.1-99.9" else 0.03)
    assert dm.dataset_key != GeoBenchDataModule(task="m-bigearthnet", root=str(tmp_path)).dataset_key


def test_fixed_scale_refuses_files_in_other_units(bench_copy: Path) -> None:
    path = eurosat_dir(bench_copy) / "band_stats.json"
    stats = json.loads(path.read_text())
    stats["04 - Red"]["mean"] = 0.12  # reflectance, not digital numbers
    path.write_text(json.dumps(stats))
    with pytest.raises(ValueError, match=r"band_stats\.json: band '04 - Red' has mean 0\.12.*'pixel_scale'"):
        GeoBenchDataModule(task="m-eurosat", root=str(bench_copy))
    dm = GeoBenchDataModule(task="m-eurosat", root=str(bench_copy), pixel_scale=0.3, bands=["red"])
    assert dm.split_spec.scale == (0.3,)


def test_band_stats_values_are_part_of_the_dataset_key(bench_copy: Path) -> None:
    before = GeoBenchDataModule(task="m-eurosat", root=str(bench_copy), normalization="minmax").dataset_key
    path = eurosat_dir(bench_copy) / "band_stats.json"
    stats = json.loads(path.read_text())
    stats["04 - Red"]["max"] += 100
    path.write_text(json.dumps(stats))
    assert (
        GeoBenchDataModule(task="m-eurosat", root=str(bench_copy), normalization="minmax").dataset_key
        != before
    )


@pytest.mark.parametrize(("batch_size", "expected"), [(8, [4]), (3, [4]), (2, [2, 2]), (1, [1, 1, 1, 1])])
def test_split_smaller_than_a_batch_trains_and_a_batch_of_one_is_merged(
    bench: Path, batch_size, expected
) -> None:
    dm = GeoBenchDataModule(task="m-eurosat", root=str(bench), batch_size=batch_size)
    dm.setup("fit")
    loader = dm.train_dataloader()
    sizes = [len(batch["sample"]) for batch in loader]
    assert sorted(sizes) == expected and len(loader) == len(expected)
    assert sorted(name for batch in loader for name in batch["sample"]) == sorted(
        r.name for r in dm.train_dataset.records
    )


def test_small_label_partition_fits_under_lightning(bench: Path, tmp_path: Path) -> None:
    """0.50x partition: 2 samples, batch 32 (the paper's): training runs a step instead of none."""
    from lightning.pytorch import Trainer

    from tests.test_difuser_module import small_module

    dm = GeoBenchDataModule(task="m-eurosat", root=str(bench), train_fraction=0.5, image_size=32)
    module = small_module("classification", num_classes=10)
    trainer = Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1


def test_predict_split_all_covers_every_split(bench: Path) -> None:
    dm = GeoBenchDataModule(task="m-eurosat", root=str(bench), predict_split="all")
    dm.setup("predict")
    assert len(dm.predict_dataset) == 6


@pytest.mark.parametrize(
    ("key", "value"),
    [("batch_size", 0), ("batch_size", -1), ("num_workers", -1), ("image_size", 0), ("image_size", -8)],
)
def test_bad_loader_key_is_the_last_line_naming_it(bench: Path, tmp_path: Path, capsys, key, value) -> None:
    from lightning_cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "difuser_cls.yaml"
    args = ["--config", str(config), "--data.init_args.root", str(bench), f"--data.init_args.{key}={value}"]
    args += ["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(args, run=False)
    assert exit_info.value.code != 0
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and f"data.init_args.{key}" in last_line
    assert f"got {value}" in last_line and len(last_line) < 200
