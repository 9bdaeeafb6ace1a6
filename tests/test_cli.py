"""The CLI runs fit, test and predict for every baseline's tiny config, plus rollouts and config errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from lightning_cli import main
from tests.fixtures.make_s2_dataset import make_s2_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO_ROOT / "data" / "demo"
TINY_CONFIGS = ("persistence", "simvp", "predrnn")


def tiny_args(name: str, root_dir: Path, data_root: Path = DEMO_DATA) -> list[str]:
    return [
        "--config",
        str(REPO_ROOT / "configs" / "tiny" / f"{name}.yaml"),
        "--data.init_args.root",
        str(data_root),
        "--trainer.default_root_dir",
        str(root_dir),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]


def source_window(region: str, transform: tuple[float, ...]) -> tuple[rasterio.DatasetReader, int, int]:
    """Open the region's t0 frame and locate the window whose origin is ``transform``'s."""
    src = rasterio.open(DEMO_DATA / region / f"s2_rgb_{region}_t0_10km.tif")
    col, row = ~src.transform @ (transform[2], transform[5])
    assert col == pytest.approx(round(col)) and row == pytest.approx(round(row))
    return src, round(row), round(col)


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_fit_test_predict_tiny_config(name, tmp_path):
    args = tiny_args(name, tmp_path)
    fit = main(["fit", *args, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                "--trainer.limit_val_batches", "1"])  # fmt: skip
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "val/loss" in fit.trainer.callback_metrics and "val/gssim" in fit.trainer.callback_metrics
    checkpoint = ["--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt")]

    test = main(["test", *args, *checkpoint, "--trainer.limit_test_batches", "1"])
    assert {"test/l1", "test/mse", "test/psnr", "test/ssim", "test/gssim"} <= set(
        test.trainer.callback_metrics
    )
    with (tmp_path / "test_results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model"] for row in rows] == [
        {"persistence": "Persistence", "simvp": "SimVP"}.get(name, "PredRNN")
    ]
    assert float(rows[0]["l1"]) == pytest.approx(float(test.trainer.callback_metrics["test/l1"]), rel=1e-5)

    main(["predict", *args, *checkpoint, "--trainer.limit_predict_batches", "1"])
    outputs = sorted((tmp_path / "predictions").iterdir())
    assert len(outputs) == 4 and all(path.suffix == ".tif" for path in outputs)
    for path in outputs:
        region = next(r.name for r in DEMO_DATA.iterdir() if path.name.startswith(f"{r.name}_t1_"))
        with rasterio.open(path) as out:
            transform, forecast = tuple(out.transform)[:6], out.read()
            src, row, col = source_window(region, transform)
            with src:
                assert (
                    out.crs == src.crs
                    and out.transform.a == src.transform.a
                    and out.transform.e == src.transform.e
                )
                if name == "persistence":
                    expected = src.read(window=Window(col, row, 64, 64)).astype(np.float32) * np.float32(1e-4)
                    np.testing.assert_allclose(forecast, expected, atol=1e-6)
        assert forecast.dtype == np.float32 and forecast.min() >= 0 and forecast.max() <= 1


def test_rollout_logs_metrics_per_step_and_saves_strip(tmp_path):
    data = make_s2_dataset(tmp_path / "data", years=(2019, 2020, 2021), embeddings=False, height=64, width=64)
    args = tiny_args("persistence", tmp_path / "run", data_root=data)
    cli = main(["test", *args, "--data.init_args.sequence", "true", "--data.init_args.batch_size", "1",
                "--data.init_args.time_regex", r"\d{4}"])  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert {"test/step_1/l1", "test/step_2/l1", "test/step_2/gssim"} <= set(metrics)
    assert "test/l1" not in metrics
    assert list((tmp_path / "run" / "rollouts").glob("Persistence_*.png"))
    with (tmp_path / "run" / "test_results.csv").open() as handle:
        assert [row["model"] for row in csv.DictReader(handle)] == [
            "Persistence step 1",
            "Persistence step 2",
        ]


def test_print_config_shows_merged_configs(tmp_path, capsys):
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args:\n    network:\n      init_args:\n        hidden_spatial: 24\n")
    config = str(REPO_ROOT / "configs" / "tiny" / "simvp.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--config", str(override), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "SimVP" in printed and "hidden_spatial: 24" in printed and "seed_everything: 0" in printed


def test_unknown_config_key_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    learning_rat: 0.1\n")
    config = str(REPO_ROOT / "configs" / "tiny" / "simvp.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--config", str(bad)])
    assert exit_info.value.code != 0
    assert "learning_rat" in capsys.readouterr().err
