"""The forecast pictures: validation panel, per-region rollout figure, per-step metric plot.

Plain functions returning a ``Picture``: a matplotlib ``Figure`` drawn on the Agg canvas (built without pyplot, so
there is no global figure state to leak and nothing opens a window) and a caption carrying the metrics, for W&B.
Reflectance is shown with a robust percentile stretch shared by every image of one panel (input, truth and
forecasts; its limits come from the real frames), so a forecast that is too bright looks too bright; pixels outside the valid mask are drawn in
``NODATA_COLOUR``. Metrics are ``metrics.functional``'s, on valid pixels only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from torch import Tensor

from fileio import atomic_path
from metrics.functional import GSSIM_SCALES, SSIM_KERNEL_SIZE, gssim, psnr, ssim

STRETCH_PERCENTILES = (2.0, 98.0)
"""Lower and upper percentile of a panel's valid real reflectances mapped to black and white."""
STRETCH_EPSILON = 1e-5
"""Added to the percentile range (as torchgeo does) so a constant image does not divide by zero."""
DISPLAY_GAMMA = 1 / 2.2
"""Reflectance is linear in light while screens expect gamma-encoded values, so the stretched reflectance is encoded
like sRGB (power 1/2.2): dark vegetation stays readable (median display value 0.45-0.74 on the demo tiles against
0.17-0.52 without it)."""
NODATA_COLOUR = (0.55, 0.55, 0.55)
"""Neutral grey for pixels outside the valid mask (nodata/NaN in a frame)."""
ERROR_SCALE = 0.2
"""Top of the |error| colour scale: mean absolute RGB reflectance error. Real seasonal change on the demo scene
(persistence, two acquisitions weeks apart) has its 99.9th percentile at 0.17, so typical errors stay inside it."""
ERROR_GAMMA = 0.5
"""The |error| colours are spaced by the square root of the error, so errors of 0.01-0.05 stay distinguishable."""
ERROR_CMAP = "inferno"
ERROR_TICKS = (0.0, 0.01, 0.05, 0.1)
TILE_INCHES = 2.0
ROW_INCHES = TILE_INCHES + 1.0
"""A row of tiles with its title and up to four lines of metrics under it, so the tiles' width sets the layout."""
DPI = 100
ROLLOUT_METRICS = ("psnr", "ssim", "gssim")
METRIC_TITLES = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "gssim": "GSSIM",
    "l1": "L1",
    "mse": "MSE",
    "lpips": "LPIPS",
}
STEP_ROW = re.compile(r"^(?P<model>.+) step (?P<step>\d+)$")
"""Results-table row of one rollout step (``ForecastTask`` writes ``<model> step <n>``)."""


class Picture(NamedTuple):
    """A figure and the caption logged beside it (its metrics as text)."""

    figure: Figure
    caption: str


def stretch(images: Tensor, valid: Tensor | None = None, reference: int | None = None) -> np.ndarray:
    """``(N, 3, H, W)`` reflectances to ``(N, H, W, 3)`` display colours in [0, 1] with one shared stretch.

    ``STRETCH_PERCENTILES`` of the valid pixels of the first ``reference`` images (the real frames of a panel;
    None: all ``N``), all channels jointly, map to 0 and 1 for every image (the mapping of torchgeo's
    ``percentile_normalization``, whose limits come from the array it scales: here they come from the real frames
    only, so that a wild forecast cannot wash them out), so images stay comparable and colours keep their
    balance; then ``DISPLAY_GAMMA`` encodes them.
    ``valid`` ``(N, H, W)`` marks valid pixels (None: all); the others get ``NODATA_COLOUR``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"stretch: expected RGB images (N, 3, H, W), got {tuple(images.shape)}")
    pixels = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    keep = (
        np.ones(pixels.shape[:3], dtype=bool) if valid is None else valid.detach().cpu().numpy().astype(bool)
    )
    if keep.shape != pixels.shape[:3]:
        raise ValueError(f"stretch: valid mask {keep.shape} does not match images {tuple(images.shape)}")
    shown = np.empty_like(pixels)
    shown[...] = NODATA_COLOUR
    if not keep.any():
        return shown
    references = pixels[:reference][keep[:reference]]
    if not references.size:  # no valid real pixel: the forecasts are all there is to show
        references = pixels[keep]
    low, high = np.percentile(references, STRETCH_PERCENTILES)
    shown[keep] = np.clip((pixels[keep] - low) / (high - low + STRETCH_EPSILON), 0.0, 1.0) ** DISPLAY_GAMMA
    return shown


def error_map(forecast: Tensor, target: Tensor, valid: Tensor | None = None) -> np.ma.MaskedArray:
    """Mean absolute RGB error ``(H, W)`` of one ``(3, H, W)`` forecast, masked where ``valid`` is False."""
    error = (forecast.detach().float().cpu() - target.detach().float().cpu()).abs().mean(dim=0).numpy()
    invalid = (
        np.zeros(error.shape, dtype=bool) if valid is None else ~valid.detach().cpu().numpy().astype(bool)
    )
    return np.ma.masked_array(error, mask=invalid)


def error_norm(scale: float = ERROR_SCALE) -> PowerNorm:
    """The fixed |error| colour scale: 0 to ``scale`` reflectance, square-root spaced."""
    if scale <= 0:
        raise ValueError(f"error scale must be > 0, got {scale}")
    return PowerNorm(gamma=ERROR_GAMMA, vmin=0.0, vmax=scale, clip=True)


def panel_metrics(forecast: Tensor, target: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """PSNR, SSIM and GSSIM of one ``(3, H, W)`` forecast on its valid pixels; a metric the tile is too small
    for (SSIM under 11 px, GSSIM under 44 px) is left out, one with nothing valid to score is NaN."""
    preds, truth = forecast[None].detach().float().cpu(), target[None].detach().float().cpu()
    mask = None if valid is None else valid[None].detach().cpu().bool()
    values = {"psnr": float(psnr(preds, truth, reduction="none", mask=mask)[0])}
    side = min(preds.shape[-2:])
    if side >= SSIM_KERNEL_SIZE:
        values["ssim"] = float(ssim(preds, truth, reduction="none", mask=mask)[0])
    if side >= SSIM_KERNEL_SIZE * GSSIM_SCALES[-1]:
        values["gssim"] = float(gssim(preds, truth, reduction="none", mask=mask)[0])
    return values


def format_metrics(values: Mapping[str, float], separator: str = ", ") -> str:
    """``PSNR 24.10 dB, SSIM 0.712, GSSIM 0.453`` (``n/a`` for NaN: nothing valid to score)."""
    parts = []
    for key, value in values.items():
        name = key.upper()
        if math.isnan(value):
            parts.append(f"{name} n/a")
        elif key == "psnr":
            parts.append(f"{name} {value:.2f} dB")
        else:
            parts.append(f"{name} {value:.3f}")
    return separator.join(parts)


def _bare(axes) -> None:
    """An image tile: no ticks or frame, but room for a title and an x label (the metrics)."""
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(False)


def _tile(axes, colours: np.ndarray, title: str | None = None, label: str | None = None) -> None:
    axes.imshow(colours, interpolation="nearest")
    _bare(axes)
    if title:
        axes.set_title(title, fontsize=9)
    if label:
        axes.set_xlabel(label, fontsize=8)


def check_panel_images(
    input: Tensor, target: Tensor, forecasts: Mapping[str, Tensor], mask: Tensor | None = None
) -> None:
    """Fail with one line unless input, target and forecasts are ``(B >= 1, 3, H, W)`` alike and ``mask``
    (when given) is ``(B, H, W)``: ``forecast_panel``'s contract, cheap enough for a sanity check."""
    if target.ndim != 4 or target.shape[1] != 3 or not len(target):
        raise ValueError(f"forecast images: 'target' must be (B >= 1, 3, H, W), got {tuple(target.shape)}")
    if not forecasts:
        raise ValueError("forecast images: no forecast given")
    for key, value in {"input": input, **forecasts}.items():
        if value.shape != target.shape:
            raise ValueError(
                f"forecast images: {key!r} must be (B, 3, H, W) like 'target' {tuple(target.shape)}, "
                f"got {tuple(value.shape)}"
            )
    if mask is not None and mask.shape != (target.shape[0], *target.shape[2:]):
        raise ValueError(
            f"forecast images: mask {tuple(mask.shape)} does not match target {tuple(target.shape)}"
        )


def _error_cmap():
    """The error colour map with invalid pixels in the nodata colour."""
    return colormaps[ERROR_CMAP].with_extremes(bad=NODATA_COLOUR)


def forecast_panel(
    input: Tensor,
    target: Tensor,
    forecasts: Mapping[str, Tensor],
    mask: Tensor | None = None,
    num_samples: int = 4,
    error_scale: float = ERROR_SCALE,
    title: str | None = None,
) -> Picture:
    """Validation grid, one row per sample: input | truth | each model's forecast | each model's |error|.

    ``input`` (the last history frame), ``target`` and every forecast are ``(B, 3, H, W)`` reflectances; ``mask``
    ``(B, H, W)`` marks valid pixels (None: all). Each row has its own shared stretch; the metrics of each
    forecast are written under it and in the caption; the error maps share the fixed scale ``error_norm``.
    """
    check_panel_images(input, target, forecasts, mask)
    if num_samples < 1:
        raise ValueError(f"forecast_panel: num_samples must be >= 1, got {num_samples}")
    rows = min(num_samples, target.shape[0])
    names = list(forecasts)
    columns = 2 + 2 * len(names)
    size = (TILE_INCHES * columns, ROW_INCHES * rows + 1.0)
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    norm = error_norm(error_scale)
    captions = []
    for row in range(rows):
        valid = None if mask is None else mask[row]
        images = torch.stack([input[row], target[row], *(forecasts[name][row] for name in names)])
        colours = stretch(images, None if valid is None else valid.expand(len(images), -1, -1), reference=2)
        titles = ["input (last frame)", "truth", *names] if row == 0 else [None] * len(images)
        sample_metrics = []
        for column, (colours_of, title_of) in enumerate(zip(colours, titles, strict=True)):
            label = None
            if column >= 2:
                values = panel_metrics(images[column], target[row], valid)
                sample_metrics.append(f"{names[column - 2]} {format_metrics(values)}")
                label = format_metrics(values, separator="\n")
            _tile(grid[row, column], colours_of, title_of, label)
        grid[row, 0].set_ylabel(f"sample {row}", fontsize=9)
        for index, name in enumerate(names):
            axes = grid[row, 2 + len(names) + index]
            error = error_map(forecasts[name][row], target[row], valid)
            shown = axes.imshow(error, cmap=_error_cmap(), norm=norm, interpolation="nearest")
            _bare(axes)
            if row == 0:
                axes.set_title(f"|error| {name}", fontsize=9)
            axes.set_xlabel(f"MAE {float(error.mean()):.4f}" if error.count() else "MAE n/a", fontsize=8)
        captions.append(f"sample {row}: " + "; ".join(sample_metrics))
    colorbar = figure.colorbar(
        shown, ax=grid[:, 2 + len(names) :].ravel().tolist(), location="bottom", shrink=0.9, extend="max",
        ticks=[tick for tick in ERROR_TICKS if tick < error_scale] + [error_scale],
    )  # fmt: skip
    colorbar.set_label("|error| (reflectance, mean of RGB)", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=11)
    return Picture(figure, (f"{title}: " if title else "") + " | ".join(captions))


def rollout_figure(
    frames: Tensor,
    forecasts: Tensor,
    times: Sequence[str],
    valid: Tensor | None = None,
    forecast_valid: Tensor | None = None,
    step_metrics: Sequence[Mapping[str, float]] | None = None,
    model: str = "forecast",
    title: str | None = None,
) -> Picture:
    """Truth row over forecast row, one column per time step (year), the metrics of each step under it.

    ``frames`` ``(T, 3, H, W)`` are the real frames; ``forecasts`` ``(F, 3, H, W)`` forecast the last ``F`` of
    them (a rollout after ``T - F`` real inputs), so the first forecast-row columns say "input". ``valid``
    ``(T, H, W)`` marks each frame's valid pixels and ``forecast_valid`` ``(F, H, W)`` the pixels each step is
    scored on (None: all). ``step_metrics`` (one mapping per step) are shown when given (e.g. computed at full
    resolution before the frames were downsampled), else computed here with ``panel_metrics``.
    """
    if (
        frames.ndim != 4
        or frames.shape[1] != 3
        or forecasts.ndim != 4
        or forecasts.shape[1:] != frames.shape[1:]
    ):
        raise ValueError(
            f"rollout_figure: expected frames (T, 3, H, W) and forecasts (F, 3, H, W), "
            f"got {tuple(frames.shape)} and {tuple(forecasts.shape)}"
        )
    num_frames, num_steps = len(frames), len(forecasts)
    if not 0 < num_steps < num_frames:
        raise ValueError(f"rollout_figure: {num_steps} forecasts for {num_frames} frames (need 1 to T - 1)")
    if len(times) != num_frames:
        raise ValueError(f"rollout_figure: {len(times)} times for {num_frames} frames")
    first = num_frames - num_steps
    frame_valid = torch.ones(frames.shape[0], *frames.shape[2:], dtype=torch.bool) if valid is None else valid
    step_valid = frame_valid[first:] if forecast_valid is None else forecast_valid
    if step_metrics is None:
        step_metrics = [
            panel_metrics(forecasts[i], frames[first + i], step_valid[i]) for i in range(num_steps)
        ]
    if len(step_metrics) != num_steps:
        raise ValueError(f"rollout_figure: {len(step_metrics)} metric sets for {num_steps} steps")
    colours = stretch(
        torch.cat([frames, forecasts]),
        torch.cat([frame_valid.cpu(), step_valid.cpu()]).bool(),
        reference=num_frames,
    )
    figure = Figure(figsize=(TILE_INCHES * num_frames, 2 * TILE_INCHES + 1.8), dpi=DPI, layout="constrained")
    grid = figure.subplots(2, num_frames, squeeze=False)
    for column in range(num_frames):
        _tile(grid[0, column], colours[column], str(times[column]))
        axes = grid[1, column]
        if column < first:
            _bare(axes)
            axes.text(0.5, 0.5, "input", ha="center", va="center", fontsize=9, transform=axes.transAxes)
            continue
        step = column - first
        label = f"step {step + 1}\n" + format_metrics(step_metrics[step], separator="\n")
        _tile(axes, colours[num_frames + step], label=label)
    grid[0, 0].set_ylabel("truth", fontsize=10)
    grid[1, 0].set_ylabel(model, fontsize=10)
    if title:
        figure.suptitle(title, fontsize=11)
    caption = "; ".join(
        f"step {step + 1} ({times[first + step]}): {format_metrics(values)}"
        for step, values in enumerate(step_metrics)
    )
    return Picture(figure, (f"{title}: " if title else "") + caption)


def step_rows(rows: Mapping[str, Mapping[str, float]]) -> dict[str, dict[int, Mapping[str, float]]]:
    """Results-table rows ``<model> step <n>`` grouped by model: ``{model: {n: metrics}}``, steps in order."""
    models: dict[str, dict[int, Mapping[str, float]]] = {}
    for name, values in rows.items():
        match = STEP_ROW.match(name)
        if match:
            models.setdefault(match["model"], {})[int(match["step"])] = values
    return {model: dict(sorted(steps.items())) for model, steps in models.items()}


def metrics_per_step_figure(
    rows: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str] = ROLLOUT_METRICS,
    step_labels: Mapping[int, str] | None = None,
    title: str | None = None,
) -> Picture:
    """One line per model for each metric over the rollout steps (years), from results-table rows.

    ``rows`` is ``metrics.table.read_rows``'s mapping; the rows named ``<model> step <n>`` are plotted (others,
    e.g. single-step rows, are ignored). ``step_labels`` names the steps on the x axis (``{1: "2020"}``).
    """
    models = step_rows(rows)
    if not models:
        raise ValueError(f"metrics_per_step_figure: no '<model> step <n>' rows among {list(rows)}")
    figure = Figure(figsize=(4.0 * len(metrics), 3.4), dpi=DPI, layout="constrained")
    grid = figure.subplots(1, len(metrics), squeeze=False)[0]
    all_steps = sorted({step for steps in models.values() for step in steps})
    labels = [
        f"{step_labels[s]}\n(step {s})" if step_labels and s in step_labels else f"step {s}"
        for s in all_steps
    ]
    captions = []
    for axes, metric in zip(grid, metrics, strict=True):
        for model, steps in models.items():
            points = [(step, values[metric]) for step, values in steps.items() if metric in values]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=model)
                captions.append(f"{model} {metric.upper()}: " + ", ".join(f"{v:.3f}" for _, v in points))
        axes.set_title(METRIC_TITLES.get(metric, metric.upper()), fontsize=10)
        axes.set_xticks(all_steps, labels, fontsize=8)
        axes.grid(alpha=0.3)
        axes.margins(x=0.15)
    grid[0].legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    return Picture(figure, (f"{title}: " if title else "") + "; ".join(captions))


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG to ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)
    return path
