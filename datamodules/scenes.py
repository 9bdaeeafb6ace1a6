"""Whole-scene forecasting input: the last ``history`` frames of every region, tiled into overlapping windows.

``predict`` forecasts a real future from the history alone: no split and no target frame, every region of the
folder, the time step after the last one (``horizon`` steps autoregressively). Discovery, validation, readers,
nodata and reflectance scaling are those of :class:`datamodules.s2_timeseries.S2ForecastDataModule`, which
builds this dataset in its predict stage (``predict_mode: scene``).

Each window is rolled out ``horizon`` steps on its own (each forecast fed back as its newest input): memory
stays bounded by the window batch and windows stay independent; the blended mosaic of step n is therefore not
the input of step n+1 (neighbouring windows' rollouts are blended per step instead). A sample carries what
``callbacks.MosaicWriter`` needs to place and write it: ``window`` (row, col), ``scene`` (JSON of the scene's
size, transform, nodata, band descriptions, data type, scaling, window count and forecast time keys), plus the
forecasting batch's ``region``, ``time``, ``target_time`` (the first forecast key), ``crs`` and ``transform``.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import torch
from torchgeo.datasets import NonGeoDataset

from datamodules.s2_timeseries import (
    PixelReader,
    RegionSeries,
    S2DataError,
    S2ForecastDataModule,
    _window_meta,
    window_invalid_counts,
)


def scene_offsets(length: int, patch_size: int, overlap: int) -> list[int]:
    """Window starts at stride ``patch_size - overlap`` covering ``length``; the last window is edge-aligned."""
    stride = patch_size - overlap
    starts = list(range(0, length - patch_size + 1, stride))
    if starts[-1] + patch_size < length:
        starts.append(length - patch_size)
    return starts


def next_time_key(last: str, steps: int, time_step: int | None) -> str:
    """The key ``steps`` steps after ``last``: its last number advanced by ``steps * time_step`` (zero padding
    kept: 2018 -> 2019, t1 -> t2); a key without a number becomes ``<last>+<steps>``."""
    matches = list(re.finditer(r"\d+", last))
    if not matches:
        return f"{last}+{steps}"
    digits = matches[-1]
    number = int(digits.group()) + steps * (time_step or 1)
    return f"{last[: digits.start()]}{number:0{len(digits.group())}d}{last[digits.end() :]}"


@dataclass
class SceneWindows:
    """One region's history frames and the windows (row, col) forecast over its scene."""

    region: RegionSeries
    frames: list[int]
    windows: list[tuple[int, int]]
    forecast_times: list[str]
    metadata: str  # JSON, shared by every window of the scene


class S2SceneDataset(NonGeoDataset):
    """Overlapping windows over whole scenes, history frames only (see the module docstring for a sample)."""

    def __init__(self, scenes: list[SceneWindows], patch_size: int, reader: PixelReader, horizon: int):
        self.scenes = scenes
        self.patch_size = patch_size
        self.reader = reader
        self.horizon = horizon
        self._index = [(s, w) for s, scene in enumerate(scenes) for w in range(len(scene.windows))]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene_index, window_index = self._index[index]
        scene = self.scenes[scene_index]
        region, size = scene.region, self.patch_size
        row, col = scene.windows[window_index]
        history, valid = self.reader.read_history(region, scene.frames, row, col, size)
        last = region.times[scene.frames[-1]]
        return {
            "image": history,
            "mask": valid,
            "window": torch.tensor([row, col]),
            "horizon": torch.tensor(self.horizon),
            "scene": scene.metadata,
            "time": last,
            "target_time": scene.forecast_times[0],
            **_window_meta(region, row, col, size),
        }

    def __str__(self) -> str:
        return f"S2SceneDataset: {len(self.scenes)} scenes, {len(self)} windows of {self.patch_size} px"


def _scene_metadata(
    datamodule: S2ForecastDataModule,
    region: RegionSeries,
    frames: list[int],
    windows: int,
    overlap: int,
    forecast_times: list[str],
) -> str:
    """What the writer needs of a scene, from its newest frame (the template of the written mosaic)."""
    last = frames[-1]
    with rasterio.open(region.rgb_paths[last]) as src:
        descriptions, dtype = list(src.descriptions), src.dtypes[0]
    reader = datamodule.reader
    return json.dumps(
        {
            "source": str(region.rgb_paths[last]),
            "height": region.height,
            "width": region.width,
            "transform": list(tuple(region.transform)[:6]),
            "nodata": region.rgb_nodata[last],
            "descriptions": descriptions,
            "dtype": dtype,
            "reflectance_scale": reader.reflectance_scale,
            "reflectance_offset": reader.reflectance_offset,
            "patch_size": datamodule.patch_size,
            "overlap": overlap,
            "windows": windows,
            "forecast_times": forecast_times,
        }
    )


def scene_dataset(datamodule: S2ForecastDataModule) -> S2SceneDataset:
    """Every region of ``datamodule.root``, its last ``history`` frames tiled with ``predict_overlap``; windows
    whose history has more invalid pixels than ``max_invalid_fraction`` are skipped (left nodata) and counted."""
    size, history, horizon = datamodule.patch_size, datamodule.history, datamodule.hparams.predict_horizon
    overlap = datamodule.hparams.predict_overlap
    overlap = size // 4 if overlap is None else overlap
    regions = datamodule._discover(history_only=True)
    records = datamodule._records(regions)
    limit = datamodule.max_invalid_fraction * size**2
    scenes, skipped = [], {}
    for region in regions:
        frame_invalid, _ = datamodule._validate_region(region, records)
        frames = list(range(len(region.times) - history, len(region.times)))
        rows = scene_offsets(region.height, size, overlap)
        cols = scene_offsets(region.width, size, overlap)
        invalid = np.logical_or.reduce([frame_invalid[i] for i in frames])
        windows = [(r, c) for r in rows for c in cols]
        if invalid.any():
            counts = window_invalid_counts(invalid, size)
            windows = [(r, c) for r, c in windows if counts[r, c] <= limit]
            if len(windows) < len(rows) * len(cols):
                skipped[region.name] = len(rows) * len(cols) - len(windows)
        if windows:
            last = region.times[frames[-1]]
            times = [next_time_key(last, step, datamodule.time_step) for step in range(1, horizon + 1)]
            metadata = _scene_metadata(datamodule, region, frames, len(windows), overlap, times)
            scenes.append(SceneWindows(region, frames, windows, times, metadata))
    if skipped:
        warnings.warn(
            f"windows skipped by max_invalid_fraction={datamodule.max_invalid_fraction} (left nodata in the "
            f"mosaics): {skipped}",
            stacklevel=2,
        )
    if not scenes:
        raise S2DataError(f"no window to forecast under root={datamodule.root} (every window is invalid)")
    return S2SceneDataset(scenes, size, datamodule.reader, horizon)
