"""The figures package: percentile stretch, error scale, metric captions, per-region rollouts, per-step plot."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from torchgeo.datasets.utils import percentile_normalization

import lightning_modules.forecast_task as forecast_task
from datamodules.synthetic.s2 import make_s2_dataset
from figures import (
    DISPLAY_GAMMA,
    ERROR_SCALE,
    NODATA_COLOUR,
    RegionRollouts,
    error_map,
    error_norm,
    forecast_panel,
    format_metrics,
    metrics_per_step_figure,
    panel_metrics,
    rollout_figure,
    stretch,
)
from lightning_cli import main
from metrics.functional import gssim, psnr, ssim
from metrics.table import append_row, read_rows

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO_ROOT / "data" / "demo"


def demo_frame(region: str, time: str) -> torch.Tensor:
    """A whole real Sentinel-2 RGB tile of the shipped demo data (about 190 x 193 px), reflectance in [0, 1]."""
    with rasterio.open(DEMO_DATA / region / f"s2_rgb_{region}_{time}_10km.tif") as src:
        return torch.from_numpy(src.read().astype(np.float32) * 1e-4).clamp(0, 1)


def test_stretch_spreads_real_frames_that_a_linear_mapping_leaves_dark():
    frames = sorted(DEMO_DATA.glob("*/s2_rgb_*_10km.tif"))
    assert len(frames) == 12
    for path in frames:
        frame = demo_frame(path.parent.name, path.name.split("_")[-2])
        assert frame.median() < 0.15  # reflectance 0.03-0.3 shown linearly: nearly black
        shown = stretch(frame[None])
        assert shown.shape == (1, *frame.shape[1:], 3) and shown.min() == 0.0 and shown.max() == 1.0
        assert 0.35 < np.median(shown) < 0.8, path.name


def test_stretch_is_shared_by_the_panel_and_ignores_invalid_pixels():
    frame = demo_frame("austria_r1c1", "t0")[:, :64, :64]
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[1, :8] = False
    brighter = frame * 1.5
    brighter[:, :8] = 1e4  # an outlier where the data is invalid changes nothing
    shown = stretch(torch.stack([frame, brighter]), valid)
    assert np.median(shown[1, 8:]) > np.median(shown[0, 8:]) + 0.05  # one stretch: brighter stays brighter
    assert (shown[1, :8] == np.asarray(NODATA_COLOUR, dtype=np.float32)).all()
    np.testing.assert_array_equal(shown, stretch(torch.stack([frame, frame * 1.5]), valid))
    assert (
        stretch(frame[None], torch.zeros(1, 64, 64, dtype=torch.bool)) == np.float32(NODATA_COLOUR[0])
    ).all()
    with pytest.raises(ValueError, match="RGB"):
        stretch(frame[:2][None])


def test_stretch_limits_come_from_the_real_frames():
    input, target = demo_frame("austria_r0c1", "t0"), demo_frame("austria_r0c1", "t1")
    alone = stretch(torch.stack([input, target]))
    pixels = torch.stack([input, target]).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(alone, percentile_normalization(pixels, 2, 98) ** DISPLAY_GAMMA, atol=1e-6)
    wild = torch.rand_like(input, generator=torch.Generator().manual_seed(0))  # an untrained model's forecast
    shown = stretch(torch.stack([input, target, wild]), reference=2)
    np.testing.assert_array_equal(shown[:2], alone)  # the real place looks the same whatever the forecast
    assert (shown[2] == 1.0).mean() > 0.3  # the wild forecast is shown out of range, as it is


def test_error_scale_does_not_saturate_for_real_seasonal_change():
    """Persistence on the demo scene (two acquisitions weeks apart) is a typical, even large, forecast error; the
    old grid's white-at-0.1 scale saturated on about 10% of its pixels."""
    errors = np.concatenate(
        [
            error_map(demo_frame(region.name, "t0"), demo_frame(region.name, "t1")).compressed()
            for region in sorted(DEMO_DATA.iterdir())
            if region.is_dir()
        ]
    )
    assert (errors >= 0.1).mean() > 0.05
    shown = np.asarray(error_norm()(errors))
    assert (shown >= 1.0).mean() < 0.005 and ERROR_SCALE == 0.2
    assert np.median(shown) > 0.25  # the square-root spacing keeps the typical error off the bottom colour


def test_panel_metrics_score_valid_pixels_and_go_into_the_caption():
    input, target = (
        demo_frame("austria_r0c1", "t0")[:, :64, :64],
        demo_frame("austria_r0c1", "t1")[:, :64, :64],
    )
    forecast = input.clone()
    forecast[:, :16] = 1.0
    mask = torch.ones(1, 64, 64, dtype=torch.bool)
    mask[:, :16] = False
    values = panel_metrics(forecast, target, mask[0])
    assert values["psnr"] == pytest.approx(float(psnr(input[None], target[None], mask=mask)))
    assert values["ssim"] == pytest.approx(float(ssim(input[None], target[None], mask=mask)))
    assert np.isnan(values["gssim"])  # GSSIM scores fully valid images only
    full = panel_metrics(input, target)
    assert full["gssim"] == pytest.approx(float(gssim(input[None], target[None])))
    assert "gssim" not in panel_metrics(input[:, :40, :40], target[:, :40, :40])  # under 44 px
    picture = forecast_panel(
        input[None],
        target[None],
        {"Persistence": input[None], "Holed": forecast[None]},
        mask=mask,
        title="val",
    )
    assert picture.caption == (
        f"val: sample 0: Persistence {format_metrics(panel_metrics(input, target, mask[0]))}; "
        f"Holed {format_metrics(values)}"
    )
    assert f"PSNR {values['psnr']:.2f} dB" in picture.caption and "GSSIM n/a" in picture.caption
    titles = [axes.get_title() for axes in picture.figure.axes]
    assert titles[:6] == [
        "input (last frame)",
        "truth",
        "Persistence",
        "Holed",
        "|error| Persistence",
        "|error| Holed",
    ]
    with pytest.raises(ValueError, match="'Holed' must be"):
        forecast_panel(input[None], target[None], {"Holed": forecast})


def test_rollout_figure_puts_truth_over_forecasts_with_metrics_under_each_step():
    frames = torch.stack([demo_frame("austria_r1c0", time)[:, :64, :64] for time in ("t0", "t1", "t0", "t1")])
    forecasts = frames[:1].expand(3, -1, -1, -1)  # persistence from the first year
    picture = rollout_figure(
        frames, forecasts, ["2019", "2020", "2021", "2022"], model="Persistence", title="r"
    )
    axes = picture.figure.axes
    assert len(axes) == 8 and [a.get_title() for a in axes[:4]] == ["2019", "2020", "2021", "2022"]
    metrics = [panel_metrics(forecasts[i], frames[i + 1]) for i in range(3)]
    for step, values in enumerate(metrics, start=1):
        assert axes[4 + step].get_xlabel() == f"step {step}\n" + format_metrics(values, separator="\n")
    assert picture.caption.startswith(f"r: step 1 (2020): {format_metrics(metrics[0])}; step 2 (2021)")
    with pytest.raises(ValueError, match="3 times for 4 frames"):
        rollout_figure(frames, forecasts, ["a", "b", "c"])
    with pytest.raises(ValueError, match="4 forecasts for 4 frames"):
        rollout_figure(frames, frames, ["a", "b", "c", "d"])


def test_metrics_per_step_plot_has_one_line_per_model(tmp_path):
    results = tmp_path / "test_results.csv"
    append_row(results, "Persistence", {"psnr": 30.0})  # a single-step row: not a rollout step
    for model, offset in (("Persistence", 0.0), ("SimVP", 1.0)):
        for step in (1, 2, 3):
            append_row(
                results, f"{model} step {step}", {"psnr": 25 - step + offset, "ssim": 0.5, "gssim": 0.4}
            )
    picture = metrics_per_step_figure(read_rows(results), step_labels={1: "2020", 2: "2021", 3: "2022"})
    psnr_axes, ssim_axes, gssim_axes = picture.figure.axes
    assert [line.get_label() for line in psnr_axes.get_lines()] == ["Persistence", "SimVP"]
    assert len(ssim_axes.get_lines()) == len(gssim_axes.get_lines()) == 2
    assert psnr_axes.get_lines()[1].get_ydata().tolist() == [25.0, 24.0, 23.0]
    assert [label.get_text() for label in psnr_axes.get_xticklabels()] == [
        "2020\n(step 1)",
        "2021\n(step 2)",
        "2022\n(step 3)",
    ]
    assert "SimVP PSNR: 25.000, 24.000, 23.000" in picture.caption
    with pytest.raises(ValueError, match="no '<model> step <n>' rows"):
        metrics_per_step_figure({"Persistence": {"psnr": 30.0}})


def test_region_rollouts_keep_the_first_window_downsampled_with_full_resolution_metrics():
    kept = RegionRollouts(max_side=32)
    frames = torch.stack([demo_frame("austria_r0c2", time)[:, :64, :64] for time in ("t0", "t1", "t0")])
    valid = torch.ones(3, 64, 64, dtype=torch.bool)
    valid[:, 0, 0] = False
    forecasts, scored = frames[:1].expand(2, -1, -1, -1), valid[1:]
    kept.add("a", frames, forecasts, valid, scored, ["2019", "2020", "2021"])
    kept.add("a", frames.flip(-1), forecasts, valid, scored, ["2019", "2020", "2021"])  # a second window of a
    kept.add("b", frames, forecasts, valid, scored, ["2019", "2020", "2021"])
    window = kept.windows["a"]
    assert list(kept.windows) == ["a", "b"] and window.frames.shape == (3, 3, 32, 32)
    assert (
        window.frames.dtype == torch.float16 and not window.valid[:, 0, 0].any() and window.valid[:, 1:].all()
    )
    torch.testing.assert_close(
        window.frames.float(), torch.nn.functional.avg_pool2d(frames, 2), atol=1e-3, rtol=0
    )
    full_resolution = [panel_metrics(forecasts[i], frames[i + 1], scored[i]) for i in range(2)]
    assert [format_metrics(values) for values in window.step_metrics] == [
        format_metrics(values) for values in full_resolution
    ]
    assert window.step_metrics[0]["psnr"] == full_resolution[0]["psnr"]
    assert kept.step_labels() == {1: "2020", 2: "2021"}
    pictures = dict(kept.pictures("Persistence"))
    assert list(pictures) == ["a", "b"] and pictures["a"].caption.startswith(
        "Persistence rollout, region a: "
    )


def test_test_run_writes_one_rollout_figure_per_region_and_the_per_step_plot(tmp_path, monkeypatch):
    """Several windows per region (128 px regions, 64 px windows), one per batch: one figure per region."""
    data = make_s2_dataset(
        tmp_path / "data", years=(2019, 2020, 2021), embeddings=False, height=128, width=128
    )
    run = tmp_path / "run"
    append_row(run / "test_results.csv", "SimVP step 1", {"psnr": 20.0, "ssim": 0.5, "gssim": 0.3})
    plotted = []
    monkeypatch.setattr(
        forecast_task,
        "metrics_per_step_figure",
        lambda *args, **kwargs: plotted.append(metrics_per_step_figure(*args, **kwargs)) or plotted[-1],
    )
    cli = main(
        ["test", "--config", str(REPO_ROOT / "configs" / "tiny" / "persistence.yaml"),
         "--data.init_args.root", str(data), "--data.init_args.sequence", "true",
         "--data.init_args.batch_size", "1", "--data.init_args.time_regex", r"\d{4}",
         "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false"]
    )  # fmt: skip
    windows = Counter(batch["region"][0] for batch in cli.datamodule.test_dataloader())
    assert max(windows.values()) > 1
    written = sorted(path.name for path in (run / "rollouts").iterdir())
    assert written == sorted([*(f"Persistence_{region}.png" for region in windows), "metrics_per_step.png"])
    (picture,) = plotted
    assert [line.get_label() for line in picture.figure.axes[0].get_lines()] == ["SimVP", "Persistence"]
    assert picture.figure.axes[0].get_xticklabels()[0].get_text() == "2020\n(step 1)"
