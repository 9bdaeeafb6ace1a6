"""One rollout figure per region: keep the first window of each region seen during a test, draw them at its end.

A test run's rollout batches may hold several windows of one region, or one window each with a region's windows
spread over many batches; keeping only each region's first window, downsampled to ``max_side`` pixels and stored
as float16, bounds memory by the number of regions (at most ``(2T - 1) * max_side**2 * 7`` bytes per region with
its masks: 4 MiB for 5 years at 256 px), whatever the number of windows. Each step's metrics are computed on the full
resolution window first, so the numbers under a step are the window's own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from figures.forecast import Picture, panel_metrics, rollout_figure

MAX_SIDE = 256
"""Longest side (pixels) a kept window is downsampled to for its figure."""


@dataclass
class KeptWindow:
    frames: Tensor
    """``(T, 3, h, w)`` float16 real frames."""
    forecasts: Tensor
    """``(F, 3, h, w)`` float16 forecasts of the last ``F`` frames."""
    valid: Tensor
    """``(T, h, w)`` valid pixels of each frame."""
    forecast_valid: Tensor
    """``(F, h, w)`` pixels each step was scored on."""
    times: list[str]
    step_metrics: list[dict[str, float]]


def _downsample(images: Tensor, valid: Tensor, max_side: int) -> tuple[Tensor, Tensor]:
    """Area-average ``(N, C, H, W)`` images to a longest side of ``max_side``; a coarse pixel is valid only
    when every pixel it averages is (invalid pixels hold 0 and would darken it)."""
    height, width = images.shape[-2:]
    factor = max(height, width) / max_side
    if factor <= 1:
        return images, valid
    size = (max(1, math.floor(height / factor)), max(1, math.floor(width / factor)))
    small = F.adaptive_avg_pool2d(images.float(), size)
    small_valid = F.adaptive_avg_pool2d(valid[:, None].float(), size)[:, 0] >= 1.0 - 1e-6
    return small, small_valid


class RegionRollouts:
    """The first rollout window of every region, ready to draw as one figure per region."""

    def __init__(self, max_side: int = MAX_SIDE) -> None:
        if max_side < 1:
            raise ValueError(f"RegionRollouts: max_side must be >= 1, got {max_side}")
        self.max_side = max_side
        self.windows: dict[str, KeptWindow] = {}

    def add(
        self,
        region: str,
        frames: Tensor,
        forecasts: Tensor,
        valid: Tensor,
        forecast_valid: Tensor,
        times: Sequence[str],
    ) -> None:
        """Keep this window if it is the region's first: ``frames`` ``(T, 3, H, W)``, ``forecasts``
        ``(F, 3, H, W)`` of the last ``F`` frames, ``valid`` ``(T, H, W)``, ``forecast_valid`` ``(F, H, W)``
        (the pixels each step is scored on), ``times`` the ``T`` time keys."""
        if region in self.windows:
            return
        first = len(frames) - len(forecasts)
        step_metrics = [
            panel_metrics(forecasts[i], frames[first + i], forecast_valid[i]) for i in range(len(forecasts))
        ]
        frames, valid = _downsample(frames.detach().cpu(), valid.detach().cpu().bool(), self.max_side)
        forecasts, forecast_valid = _downsample(
            forecasts.detach().cpu(), forecast_valid.detach().cpu().bool(), self.max_side
        )
        self.windows[region] = KeptWindow(
            frames.half(), forecasts.half(), valid, forecast_valid, [str(t) for t in times], step_metrics
        )

    def step_labels(self) -> dict[int, str]:
        """Time key of each rollout step (``{1: "2020", ...}``) when every kept window agrees, else empty."""
        labels = {
            tuple(window.times[len(window.frames) - len(window.forecasts) :])
            for window in self.windows.values()
        }
        if len(labels) != 1:
            return {}
        return {step: time for step, time in enumerate(labels.pop(), start=1)}

    def pictures(self, model: str) -> Iterator[tuple[str, Picture]]:
        """``(region, figure)`` of ``model`` per region, drawn one at a time (save each before the next)."""
        for region, window in self.windows.items():
            yield (
                region,
                rollout_figure(
                    window.frames.float(),
                    window.forecasts.float(),
                    window.times,
                    window.valid,
                    window.forecast_valid,
                    window.step_metrics,
                    model=model,
                    title=f"{model} rollout, region {region}",
                ),
            )
