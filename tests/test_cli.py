"""The CLI runs fit, test and predict for every baseline's tiny config, plus rollouts and config errors."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import PositiveInt
from lightning.pytorch.loggers import WandbLogger
from rasterio.windows import Window

from datamodules.synthetic.geobench import write_cashew_plant, write_eurosat
from datamodules.synthetic.s2 import make_s2_dataset
from lightning_cli import main, resources
from lightning_cli.cli import config_error_line

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

    # per-window pairs (scene mosaics, the default, are tested in test_mosaic.py)
    main(["predict", *args, *checkpoint, "--trainer.limit_predict_batches", "1",
          "--data.init_args.predict_mode", "pairs"])  # fmt: skip
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


# ---------------------------------------------------------------- run folder, logger, callbacks, links, errors
TINY_FIT = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def default_logger_fit(config: Path, *extra: str) -> list[str]:
    """A user's `fit` of a shipped config: default logger (offline W&B) and run folder, tiny limits."""
    # `default_root_dir null` stands for a config that leaves the run folder to the CLI
    return ["fit", "--config", str(config), "--trainer.default_root_dir", "null", *TINY_FIT, *QUIET, *extra]


def test_fit_keeps_one_run_folder_per_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = REPO_ROOT / "configs" / "tiny" / "simvp.yaml"
    data = ["--data.init_args.root", str(DEMO_DATA)]
    first = main(default_logger_fit(config, *data, "--trainer.callbacks+=ForecastImageCallback"))
    main(default_logger_fit(config, *data, "--trainer.logger", "false", "--seed_everything", "1"))

    assert [path.name for path in tmp_path.iterdir()] == ["runs"]  # nothing beside the run folders
    runs = sorted((tmp_path / "runs" / "tiny" / "simvp").iterdir())
    assert len(runs) == 2
    run = runs[0]
    assert Path(first.trainer.default_root_dir).resolve() == run.resolve()
    assert {path.name for path in run.iterdir()} == {"checkpoints", "config.yaml", "images", "wandb"}
    checkpoints = {path.name for path in (run / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and any(name.startswith("best-") for name in checkpoints)
    assert (run / "images" / "epoch_000.png").is_file()
    assert list((run / "wandb").glob("offline-run-*"))
    assert "seed_everything: 0" in (run / "config.yaml").read_text()
    assert "seed_everything: 1" in (runs[1] / "config.yaml").read_text()
    printed = capsys.readouterr().out
    assert printed.count(f"run folder: {Path('runs') / 'tiny' / 'simvp' / run.name}") == 1
    assert f"run folder (done): {Path('runs') / 'tiny' / 'simvp' / run.name}" in printed


def test_test_of_a_run_checkpoint_writes_into_that_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = REPO_ROOT / "configs" / "tiny" / "persistence.yaml"
    args = [
        "--config",
        str(config),
        "--trainer.default_root_dir",
        "null",
        "--trainer.logger",
        "false",
        *QUIET,
    ]
    args += ["--data.init_args.root", str(DEMO_DATA)]
    fit = main(["fit", *args, *TINY_FIT])
    run = Path(fit.trainer.default_root_dir)
    main(["test", *args, "--ckpt_path", "last", "--trainer.limit_test_batches", "1"])
    assert (run / "test_results.csv").is_file() and (run / "config_test.yaml").is_file()
    assert len(list((tmp_path / "runs" / "tiny" / "persistence").iterdir())) == 1


def test_wandb_offline_false_goes_online(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    base = ["--config", str(REPO_ROOT / "configs" / "tiny" / "persistence.yaml")]
    base += ["--data.init_args.root", str(DEMO_DATA), "--trainer.default_root_dir", str(tmp_path)]
    offline = main(base, run=False)
    assert offline.trainer.logger._offline
    assert offline.trainer.logger.save_dir == str(tmp_path)  # W&B files go below the run folder
    online = main([*base, "--trainer.logger.init_args.offline", "false"], run=False)
    assert not online.trainer.logger._offline and "WANDB_MODE" not in os.environ


def tiny_simvp_args(tmp_path: Path) -> list[str]:
    """configs/tiny/simvp.yaml on the demo data, no logger, run folder in ``tmp_path``."""
    args = [
        "--config",
        str(REPO_ROOT / "configs" / "tiny" / "simvp.yaml"),
        "--data.init_args.root",
        str(DEMO_DATA),
    ]
    return [*args, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]


def test_default_callbacks_are_visible_and_switchable(tmp_path, capsys):
    args = tiny_simvp_args(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["best_checkpoint"]["init_args"]["monitor"] == "val/loss"
    assert printed["last_checkpoint"]["class_path"] == "callbacks.LastCheckpoint"
    assert {"exact_resume", "nonfinite_guard"} <= set(printed)

    def callback_types(*extra: str) -> set[str]:
        return {type(callback).__name__ for callback in main([*args, *extra], run=False).trainer.callbacks}

    assert {"ModelCheckpoint", "LastCheckpoint", "ExactResume", "NonFiniteLossGuard"} <= callback_types()
    without_checkpoints = callback_types("--trainer.enable_checkpointing", "false")
    assert "ModelCheckpoint" not in without_checkpoints and "LastCheckpoint" not in without_checkpoints
    assert "ExactResume" in without_checkpoints
    assert "NonFiniteLossGuard" not in callback_types("--nonfinite_guard", "null")


def config_without_model_history(tmp_path: Path) -> Path:
    """configs/tiny/simvp.yaml with `history` only under data (as the linked configs are written)."""
    text = (REPO_ROOT / "configs" / "tiny" / "simvp.yaml").read_text()
    model, data = text.split("\ndata:\n")
    model = "\n".join(
        line for line in model.splitlines() if line.strip() not in ("history: 1", "in_frames: 1")
    )
    path = tmp_path / "simvp.yaml"
    path.write_text(f"{model}\ndata:\n{data}")
    return path


def test_history_is_set_once_under_data(tmp_path, capsys):
    args = ["--config", str(config_without_model_history(tmp_path)), "--data.init_args.root", str(DEMO_DATA)]
    args += ["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    cli = main([*args, "--data.init_args.history", "2"], run=False)
    assert cli.datamodule.history == cli.model.history == cli.model.network.in_frames == 2

    persistence = main(["--config", str(REPO_ROOT / "configs" / "tiny" / "persistence.yaml"), *args[2:],
                        "--data.init_args.history", "2"], run=False)  # fmt: skip
    assert persistence.model.history == 2  # its network takes no in_frames: that link is skipped

    with pytest.raises(SystemExit):
        main([*args, "--model.init_args.history", "3"], run=False)
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'model.init_args.history' (3)" in last_line and "'data.init_args.history' (1)" in last_line


def test_window_size_is_set_once_under_data(tmp_path, capsys):
    """The shipped forecast config sets its window size only as data.patch_size; the encoder's img_size follows."""
    args = ["--config", str(REPO_ROOT / "configs" / "tiny" / "forecast.yaml"), "--data.init_args.root"]
    args += [str(DEMO_DATA), "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    grid = [
        "--model.init_args.predictor.init_args.grid_size",
        "16",
        "--model.init_args.adapter.init_args.semantic_grid",
    ]
    cli = main([*args, "--data.init_args.patch_size", "128", *grid, "16"], run=False)
    assert cli.datamodule.patch_size == cli.model.encoder.img_size == 128
    assert cli.model.encoder.grid_size == 128 // cli.model.encoder.patch_size

    with pytest.raises(SystemExit):
        main([*args, "--model.init_args.encoder.init_args.img_size", "48"], run=False)
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'model.init_args.encoder.init_args.img_size' (48)" in last_line
    assert "'data.init_args.patch_size' (64)" in last_line


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["--data.init_args.patch_size", "-1"], "patch_size"),
        (["--model.init_args.learning_rat", "0.1"], "model.init_args.learning_rat"),
    ],
)
def test_config_error_ends_with_one_line_naming_the_key(tmp_path, capsys, override, key):
    args = tiny_simvp_args(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, *override])
    assert exit_info.value.code != 0
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert key in last_line and "config key" in last_line and len(last_line) < 200
    assert not (tmp_path / "checkpoints").exists()


FAMILIES = {
    "simvp": None,
    "difuser_cls": write_eurosat,
    "persistence": None,
    "predrnn": None,
    "forecast": None,
    "difuser_seg": write_cashew_plant,
}
FAST_FAMILIES = ("simvp", "difuser_cls")


@pytest.mark.parametrize(
    "family",
    [name if name in FAST_FAMILIES else pytest.param(name, marks=pytest.mark.slow) for name in FAMILIES],
)
def test_every_config_family_fits_with_a_logger(family, tmp_path, monkeypatch):
    """The W&B logger merges model and datamodule hparams: a key both take must agree (DiFuser's ignore_index)."""
    monkeypatch.chdir(tmp_path)
    write_task = FAMILIES[family]
    if write_task is None:
        data = ["--data.init_args.root", str(DEMO_DATA)]
    else:
        write_task(tmp_path / "geobench")
        data = ["--data.init_args.root", str(tmp_path / "geobench")]
    # the default logger, explicitly offline: every family must fit with it
    logger = ["--trainer.logger", "WandbLogger", "--trainer.logger.offline", "true"]
    cli = main(default_logger_fit(REPO_ROOT / "configs" / "tiny" / f"{family}.yaml", *data, *logger))
    assert cli.trainer.state.finished and isinstance(cli.trainer.logger, WandbLogger)
    (run,) = (tmp_path / "runs" / "tiny" / family).iterdir()
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()


def test_shipped_config_runs_from_another_folder(tmp_path, monkeypatch):
    """``--config configs/tiny/forecast.yaml`` and the paths inside it (``root: data/demo``, ``tokenizer_path:
    configs/tiny/sd3/tokenizer``) are repository-relative: from another folder they name the shipped files."""
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", "configs/tiny/forecast.yaml", "--trainer.logger", "false"], run=False)
    assert Path(cli.datamodule.root) == resources.demo_data_dir()
    text_encoders = cli.config.model.init_args.backbone.init_args.text_encoders.init_args
    assert Path(text_encoders.tokenizer_path) == resources.config_dir() / "tiny" / "sd3" / "tokenizer"
    cli.datamodule.setup("fit")
    assert len(cli.datamodule.train_dataloader()) > 0


def test_paths_from_the_current_folder_win_over_shipped_ones(tmp_path, monkeypatch):
    """A ``data/...`` path that exists from the current folder is the user's own data, used as given."""
    monkeypatch.chdir(tmp_path)
    make_s2_dataset(tmp_path / "data" / "demo", embeddings=False)
    cli = main([f"--config={resources.config_dir() / 'tiny' / 'persistence.yaml'}", "--trainer.logger", "false"],
               run=False)  # fmt: skip
    assert cli.datamodule.root == Path("data/demo")
    assert resources.shipped_path("data/missing") is None and resources.shipped_path("data") is None


class Loader:
    """A datamodule-like class whose signature validates its range (jsonargparse's PositiveInt)."""


class PositiveBatchLoader(Loader):
    def __init__(self, batch_size: PositiveInt = 8):
        self.batch_size = batch_size


def test_signature_range_error_names_the_nested_key():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Loader, "data")
    with pytest.raises(ArgumentError) as error:
        parser.parse_args(["--data", f"{__name__}.PositiveBatchLoader", "--data.batch_size", "0"])
    line = config_error_line(str(error.value))
    assert line.startswith("config key 'data.init_args.batch_size': ") and "PositiveInt" in line
