"""Bad input and faults through the CLI and DataModules, where the parts' own tests do not cover them already.

Covered elsewhere (not repeated here): S2 wrong band count, grid/CRS/embedding-grid disagreement, truncated and
corrupt files, empty split, missing root, NaN/nodata masking (``tests/test_s2_datamodule.py``); GEO-Bench truncated,
missing and corrupt samples, missing bands, NaN/Inf, empty split (``tests/test_geobench.py``); unknown config keys
(``tests/test_cli.py``, ``tests/test_faults.py``); missing SD3/metric/DiFuser weight folders at the class level
(``tests/test_sd3.py``, ``tests/test_metrics.py``, ``tests/test_difuser_module.py``); NaN loss
(``tests/test_faults.py``).
"""

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

import lightning_modules.forecast_task as forecast_task
from datamodules.s2_timeseries import S2ForecastDataModule
from datamodules.synthetic.s2 import (
    DN_SCALE,
    REGIONS,
    YEARS,
    embedding_path,
    make_s2_dataset,
    region_transform,
    rgb_path,
    write_raster,
)
from lightning_cli import main
from tests.conftest import REPO_ROOT

TINY = REPO_ROOT / "configs" / "tiny"
DEMO_DATA = REPO_ROOT / "data" / "demo"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
PATCH = 16
INF_PIXEL = (3, 3)


def _write_inf_pixel(root: Path, kind: str) -> Path:
    """A 3-region dataset whose 2nd region has +Inf at ``INF_PIXEL`` in one RGB or embedding file."""
    make_s2_dataset(root, regions=REGIONS[:3])
    region, year = REGIONS[1], YEARS[1]
    if kind == "rgb":
        path = rgb_path(root, region, year)
        with rasterio.open(path) as src:
            data = src.read().astype(np.float32)
    else:
        path = embedding_path(root, region, year)
        with rasterio.open(path) as src:
            data = src.read()
    data[:, INF_PIXEL[0], INF_PIXEL[1]] = np.inf
    return write_raster(path, data, region_transform(1))


@pytest.mark.parametrize("kind", ["rgb", "embedding"])
def test_inf_pixels_are_invalid_like_nan(tmp_path, kind):
    path = _write_inf_pixel(tmp_path, kind)
    datamodule = S2ForecastDataModule(str(tmp_path), reflectance_scale=DN_SCALE, patch_size=PATCH)
    datamodule.setup("fit")
    reader = datamodule.reader
    if kind == "rgb":
        values, valid = reader.read_rgb(path, None, 0, 0, PATCH)
    else:
        values, valid = reader.read_embedding(path, 0, 0, PATCH)
    assert torch.isfinite(values).all()
    assert not valid[INF_PIXEL], f"an Inf pixel of {path} is marked valid"


def test_forecast_config_with_missing_sd3_folder_names_the_key(monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)  # the paths of configs/forecast.yaml are relative to the repository
    assert not (REPO_ROOT / "models" / "stable-diffusion-3.5-medium").exists()
    args = ["fit", "--config", str(REPO_ROOT / "configs" / "forecast.yaml"), *QUIET]
    args += ["--data.init_args.root", str(DEMO_DATA), "--trainer.accelerator", "cpu"]
    with pytest.raises(SystemExit):  # the CLI's last line names the key
        main(args)
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "config key 'clip_l_path': model folder not found" in last_line


@pytest.mark.parametrize("key", ["lpips_weights", "fid_weights"])
def test_missing_metric_weights_name_the_key_before_training(tmp_path, key, capsys):
    args = ["fit", "--config", str(TINY / "simvp.yaml"), "--data.init_args.root", str(DEMO_DATA), *QUIET]
    args += [f"--model.init_args.{key}", str(tmp_path / "absent.pth")]
    args += ["--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(SystemExit):  # the CLI's last line names the key
        main(args)
    assert key in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "checkpoints").exists(), "training started"


def test_unwritable_predictions_folder_fails_before_the_first_forecast(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the predictions folder should go")  # unwritable even for root
    out = blocker / "predictions"
    args = ["predict", "--config", str(TINY / "persistence.yaml"), "--data.init_args.root", str(DEMO_DATA)]
    args += [*QUIET, "--trainer.limit_predict_batches", "1", "--trainer.default_root_dir", str(tmp_path)]
    args += ["--model.init_args.predict_dir", str(out)]
    forecasts = []
    real_predict_next = forecast_task.ForecastTask.predict_next

    def recording_predict_next(self, *args, **kwargs):
        forecasts.append(1)
        return real_predict_next(self, *args, **kwargs)

    monkeypatch.setattr(forecast_task.ForecastTask, "predict_next", recording_predict_next)
    with pytest.raises(OSError, match=r"predict_dir") as failure:
        main(args)
    assert str(out) in str(failure.value)
    assert not forecasts, "the folder was checked only once predicting had started"
