"""Sentinel-2 time-series forecasting data: RGB frames t-k+1..t -> frame t+1 (+ AlphaEarth embedding of t+1).

Layout (the Sat-JEPA-Diff dataset): ``<root>/<Region>/s2_rgb_<Region>_<YYYY>_10km.tif`` (3-band RGB) and,
optionally, ``<root>/<Region>/embedding_<Region>_<YYYY>_10km.tif`` (64-band AlphaEarth embedding, same grid).
Every file is opened and read once at ``setup`` so a bad file stops the run before training; samples are
then lazy rasterio windowed reads. Splits are by region, never by window, so no region leaks across splits.
"""

from __future__ import annotations

import bisect
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from lightning.pytorch.utilities import rank_zero_info
from rasterio.errors import RasterioError
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from torch import Tensor
from torch.utils.data import default_collate
from torchgeo.datamodules import NonGeoDataModule
from torchgeo.datasets import NonGeoDataset

RGB_BANDS = 3
EMBEDDING_BANDS = 64
# A file whose brightest valid pixel stays below this after scaling is almost surely scaled twice.
MIN_PLAUSIBLE_MAX_REFLECTANCE = 1e-3
VALIDATION_ROWS_PER_READ = 256
# Open GeoTIFF handles kept per process (well under common file-descriptor limits).
MAX_OPEN_FILES = 64
LIST_KEYS = ("region", "time", "target_time", "times", "crs", "transform")


class S2DataError(ValueError):
    """A data file or data configuration problem, raised at setup and naming the file or config key."""


@dataclass
class RegionSeries:
    """One region's validated time series: file paths per time key and the shared grid."""

    name: str
    times: list[str]
    rgb_paths: list[Path]
    embedding_paths: list[Path | None]
    rgb_nodata: list[float | None]
    height: int = 0
    width: int = 0
    crs_wkt: str = ""
    transform: Any = None


@dataclass
class ForecastPair:
    """History frames ``frames`` of a region predicting frame ``target``, with the windows usable for it.

    ``grid`` holds the (row, col) offsets of the fixed grid windows that pass the invalid-pixel threshold;
    ``allowed_offsets`` is a packed bit map over every crop offset (None: every offset is allowed).
    """

    region: RegionSeries
    frames: list[int]
    target: int
    grid: list[tuple[int, int]]
    skipped_windows: int
    allowed_offsets: np.ndarray | None = None
    allowed_count: int = 0


@dataclass
class SequenceWindow:
    """A grid window of a region's whole time series (sequence mode)."""

    region: RegionSeries
    row: int
    col: int


@dataclass
class SplitSummary:
    """Counts reported by :meth:`S2ForecastDataModule.dataset_summary`."""

    regions: list[str] = field(default_factory=list)
    pairs: int = 0
    windows: int = 0
    skipped_windows: int = 0


def grid_offsets(length: int, patch_size: int) -> list[int]:
    """Window starts that tile ``length`` without gaps; the last window is aligned to the edge."""
    starts = list(range(0, length - patch_size + 1, patch_size))
    if starts[-1] + patch_size < length:
        starts.append(length - patch_size)
    return starts


def natural_key(text: str) -> list[Any]:
    """Sort key treating digit runs as numbers, so time keys t2 < t10 and 2018 < 2019."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def window_invalid_counts(invalid: np.ndarray, patch_size: int) -> np.ndarray:
    """Invalid-pixel count of the window at every offset (row, col), from an integral image."""
    integral = np.zeros((invalid.shape[0] + 1, invalid.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = invalid.cumsum(0).cumsum(1)
    p = patch_size
    return integral[p:, p:] - integral[:-p, p:] - integral[p:, :-p] + integral[:-p, :-p]


def _pattern_regex(pattern: str, region: str, time_regex: str) -> re.Pattern[str]:
    """Turn a ``{region}``/``{time}`` file-name template into a regex capturing the time key."""
    pieces = re.split(r"(\{region\}|\{time\})", pattern)
    parts = []
    for piece in pieces:
        if piece == "{region}":
            parts.append(re.escape(region))
        elif piece == "{time}":
            parts.append(f"(?P<time>{time_regex})")
        else:
            parts.append(re.escape(piece))
    return re.compile("".join(parts))


def _pixel_invalid(raw: np.ndarray, nodata: float | None) -> np.ndarray:
    """(H, W) True where any band is NaN, infinite or equals the nodata value."""
    invalid = np.zeros(raw.shape[1:], dtype=bool)
    if np.issubdtype(raw.dtype, np.floating):
        invalid |= ~np.isfinite(raw).all(axis=0)
    if nodata is not None and not np.isnan(nodata):
        invalid |= (raw == nodata).any(axis=0)
    return invalid


def _open_error(path: Path, exc: Exception) -> S2DataError:
    return S2DataError(f"{path}: cannot read the file ({exc})")


class PixelReader:
    """Reads windows of validated files: scales reflectance, clips saturation, masks nodata/NaN to 0.

    Opening a GeoTIFF costs far more than reading a small window, so each process keeps its most recently
    used handles open (GDAL handles are never shared across processes: a forked worker starts afresh).
    """

    def __init__(self, reflectance_scale: float, max_open_files: int = MAX_OPEN_FILES):
        self.reflectance_scale = reflectance_scale
        self.max_open_files = max_open_files
        self._handles: OrderedDict[Path, Any] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": OrderedDict()}

    def _read(self, path: Path, window: Window) -> np.ndarray:
        if self._pid != os.getpid():
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.pop(path, None)
        if handle is None:
            handle = rasterio.open(path)
            if len(self._handles) >= self.max_open_files:
                self._handles.popitem(last=False)[1].close()
        self._handles[path] = handle
        return handle.read(window=window)

    def read_rgb(
        self, path: Path, nodata: float | None, row: int, col: int, size: int
    ) -> tuple[Tensor, Tensor]:
        """Return the (3, size, size) reflectance in [0, 1] and the (size, size) validity mask."""
        raw = self._read(path, Window(col, row, size, size))
        invalid = _pixel_invalid(raw, nodata)
        scaled = np.clip(raw.astype(np.float32) * np.float32(self.reflectance_scale), 0.0, 1.0)
        scaled[:, invalid] = 0.0
        return torch.from_numpy(scaled), torch.from_numpy(~invalid)

    def read_embedding(self, path: Path, row: int, col: int, size: int) -> tuple[Tensor, Tensor]:
        """Return the (64, size, size) embedding and its validity mask (NaN/Inf pixels are zeroed and invalid)."""
        raw = self._read(path, Window(col, row, size, size)).astype(np.float32)
        invalid = ~np.isfinite(raw).all(axis=0)
        raw[:, invalid] = 0.0
        return torch.from_numpy(raw), torch.from_numpy(~invalid)


def _window_meta(region: RegionSeries, row: int, col: int, size: int) -> dict[str, Any]:
    affine = window_transform(Window(col, row, size, size), region.transform)
    return {"region": region.name, "crs": region.crs_wkt, "transform": tuple(affine)[:6]}


class S2ForecastDataset(NonGeoDataset):
    """Forecasting samples (history -> t+1) over validated pairs; random crops or the fixed window grid.

    With ``random_crop`` each pair contributes as many samples per epoch as it has usable grid windows, and
    each sample is a crop drawn with ``torch.randint`` among offsets under the invalid-pixel threshold, so
    seeding torch (seed_everything + Lightning's worker seeding) makes crops reproducible.
    """

    def __init__(
        self, pairs: Sequence[ForecastPair], patch_size: int, reader: PixelReader, random_crop: bool
    ):
        self.pairs = list(pairs)
        self.patch_size = patch_size
        self.reader = reader
        self.random_crop = random_crop
        self._ends = np.cumsum([len(pair.grid) for pair in self.pairs]).tolist()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _locate(self, index: int) -> tuple[ForecastPair, int, int]:
        pair_index = bisect.bisect_right(self._ends, index)
        pair = self.pairs[pair_index]
        if not self.random_crop:
            start = self._ends[pair_index - 1] if pair_index else 0
            row, col = pair.grid[index - start]
            return pair, row, col
        span_rows = pair.region.height - self.patch_size + 1
        span_cols = pair.region.width - self.patch_size + 1
        if pair.allowed_offsets is None:
            flat = int(torch.randint(span_rows * span_cols, ()).item())
        else:
            allowed = np.unpackbits(pair.allowed_offsets, count=span_rows * span_cols).astype(bool)
            flat = int(np.flatnonzero(allowed)[int(torch.randint(pair.allowed_count, ()).item())])
        return pair, flat // span_cols, flat % span_cols

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        pair, row, col = self._locate(index)
        region, size = pair.region, self.patch_size
        frames, valid = [], torch.ones(size, size, dtype=torch.bool)
        for frame in pair.frames:
            pixels, frame_valid = self.reader.read_rgb(
                region.rgb_paths[frame], region.rgb_nodata[frame], row, col, size
            )
            frames.append(pixels)
            valid &= frame_valid
        target, target_valid = self.reader.read_rgb(
            region.rgb_paths[pair.target], region.rgb_nodata[pair.target], row, col, size
        )
        valid &= target_valid
        embedding_path = region.embedding_paths[pair.target]
        if embedding_path is None:
            embedding = torch.zeros(EMBEDDING_BANDS, size, size)
        else:
            embedding, embedding_valid = self.reader.read_embedding(embedding_path, row, col, size)
            valid &= embedding_valid
        return {
            "image": torch.stack(frames),
            "target": target,
            "mask": valid,
            "embedding": embedding,
            "has_embedding": torch.tensor(embedding_path is not None),
            "time": region.times[pair.frames[-1]],
            "target_time": region.times[pair.target],
            **_window_meta(region, row, col, size),
        }

    def __str__(self) -> str:
        mode = "random crops" if self.random_crop else "grid windows"
        return f"S2ForecastDataset: {len(self.pairs)} pairs, {len(self)} samples ({mode} of {self.patch_size} px)"


class S2SequenceDataset(NonGeoDataset):
    """Whole time series of grid windows, for autoregressive rollouts; ``mask`` is per frame."""

    def __init__(self, windows: Sequence[SequenceWindow], patch_size: int, reader: PixelReader):
        self.windows = list(windows)
        self.patch_size = patch_size
        self.reader = reader

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        window = self.windows[index]
        region, size = window.region, self.patch_size
        reads = [
            self.reader.read_rgb(path, nodata, window.row, window.col, size)
            for path, nodata in zip(region.rgb_paths, region.rgb_nodata, strict=True)
        ]
        return {
            "images": torch.stack([pixels for pixels, _ in reads]),
            "mask": torch.stack([valid for _, valid in reads]),
            "times": list(region.times),
            **_window_meta(region, window.row, window.col, size),
        }

    def __str__(self) -> str:
        return f"S2SequenceDataset: {len(self)} windows of {self.patch_size} px"


def collate_s2(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep region/time/crs/transform (and sequence ``times``) as plain per-sample lists."""
    batch = default_collate([{k: v for k, v in s.items() if k not in LIST_KEYS} for s in samples])
    for key in LIST_KEYS:
        if key in samples[0]:
            batch[key] = [sample[key] for sample in samples]
    return batch


class S2ForecastDataModule(NonGeoDataModule):
    """Sentinel-2 forecasting DataModule (see ``docs/DESIGN.md``, forecasting batch).

    Splits regions (seeded) into train/val(/test). With ``test_fraction=0`` the test split is the validation
    regions, as the paper evaluates on its 20% hold-out. ``holdout_last_step`` instead uses the last pair of
    every region (target = last time key) as the test set and removes it from train/val. ``sequence`` makes
    the test/predict datasets yield whole time series (one series per batch: lengths may differ).

    Args:
        root: dataset folder holding one sub-folder per region.
        reflectance_scale: factor from stored values to reflectance in [0, 1] (1e-4 for S2 L2A digital numbers,
            1.0 for stored reflectance); checked on every file at setup.
        patch_size: window size in pixels.
        history: number of input frames k (>= 1).
        rgb_pattern, embedding_pattern: file-name templates inside a region folder, with ``{region}`` and
            ``{time}``; ``embedding_pattern=None`` disables embeddings.
        time_regex: regex a time key must match (``\\d{4}`` for years); keys sort naturally (t2 < t10).
        nodata: raw value marking missing pixels; None uses each file's own nodata tag. NaN is always invalid.
        max_invalid_fraction: windows with a larger fraction of invalid pixels are skipped (and counted).
        max_saturated_fraction: fraction of valid pixels allowed outside [0, 1] after scaling (clipped).
    """

    def __init__(
        self,
        root: str,
        *,
        reflectance_scale: float,
        patch_size: int = 128,
        history: int = 1,
        batch_size: int = 8,
        num_workers: int = 0,
        rgb_pattern: str = "s2_rgb_{region}_{time}_10km.tif",
        embedding_pattern: str | None = "embedding_{region}_{time}_10km.tif",
        time_regex: str = r"\d{4}",
        nodata: float | None = None,
        max_invalid_fraction: float = 0.1,
        max_saturated_fraction: float = 0.01,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        holdout_last_step: bool = False,
        seed: int = 0,
        sequence: bool = False,
    ) -> None:
        super().__init__(S2ForecastDataset, batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        checks = {
            "reflectance_scale": (reflectance_scale, reflectance_scale > 0),
            "patch_size": (patch_size, patch_size >= 1),
            "history": (history, history >= 1),
            "max_invalid_fraction": (max_invalid_fraction, 0.0 <= max_invalid_fraction <= 1.0),
            "max_saturated_fraction": (max_saturated_fraction, 0.0 <= max_saturated_fraction <= 1.0),
            "val_fraction": (val_fraction, 0.0 < val_fraction < 1.0),
            "test_fraction": (
                test_fraction,
                0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0,
            ),
        }
        for key, (value, ok) in checks.items():
            if not ok:
                raise S2DataError(f"config key {key} has an invalid value: {value!r}")
        if holdout_last_step and test_fraction > 0:
            raise S2DataError(
                "holdout_last_step and test_fraction > 0 both define the test set; set one of them"
            )
        for key, pattern in (("rgb_pattern", rgb_pattern), ("embedding_pattern", embedding_pattern)):
            if pattern is not None and "{time}" not in pattern:
                raise S2DataError(f"config key {key}={pattern!r} must contain '{{time}}'")
        try:
            re.compile(time_regex)
        except re.error as exc:
            raise S2DataError(f"config key time_regex={time_regex!r} is not a valid regex ({exc})") from exc
        self.root = Path(root)
        self.patch_size = patch_size
        self.history = history
        self.rgb_pattern = rgb_pattern
        self.embedding_pattern = embedding_pattern
        self.time_regex = time_regex
        self.nodata = nodata
        self.max_invalid_fraction = max_invalid_fraction
        self.max_saturated_fraction = max_saturated_fraction
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.holdout_last_step = holdout_last_step
        self.seed = seed
        self.sequence = sequence
        self.reader = PixelReader(reflectance_scale)
        self.collate_fn = collate_s2
        if sequence:
            self.test_batch_size = 1
            self.predict_batch_size = 1
        self._split_pairs: dict[str, list[ForecastPair]] | None = None
        self._sequence_windows: list[SequenceWindow] = []
        self._summary: dict[str, SplitSummary] = {}
        self._excluded: list[str] = []

    # ---- discovery and validation -------------------------------------------------------------------------

    def _discover(self) -> list[RegionSeries]:
        """Find region folders and their time keys; regions too short for one sample are warned about and left out."""
        if not self.root.is_dir():
            raise S2DataError(f"config key root: {self.root} is not a directory")
        regions, self._excluded = [], []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            rgb_regex = _pattern_regex(self.rgb_pattern, folder.name, self.time_regex)
            found: dict[str, Path] = {}
            for path in sorted(folder.iterdir()):
                match = rgb_regex.fullmatch(path.name)
                if match:
                    found[match["time"]] = path
            times = sorted(found, key=natural_key)
            if len(times) < self.history + 1:
                self._excluded.append(folder.name)
                warnings.warn(
                    f"region {folder.name} ({folder}) has {len(times)} time step(s) matching rgb_pattern="
                    f"{self.rgb_pattern!r}, time_regex={self.time_regex!r}; a sample needs history+1="
                    f"{self.history + 1}: region left out",
                    stacklevel=2,
                )
                continue
            embeddings = [self._embedding_path(folder, time) for time in times]
            regions.append(
                RegionSeries(folder.name, times, [found[t] for t in times], embeddings, [None] * len(times))
            )
        if not regions:
            raise S2DataError(f"no usable region under root={self.root} (rgb_pattern={self.rgb_pattern!r})")
        return regions

    def _embedding_path(self, folder: Path, time: str) -> Path | None:
        if self.embedding_pattern is None:
            return None
        path = folder / self.embedding_pattern.format(region=folder.name, time=time)
        return path if path.exists() else None

    def _check_grid(self, region: RegionSeries, path: Path, src: Any, bands: int) -> None:
        if src.count != bands:
            raise S2DataError(f"{path}: has {src.count} bands, expected {bands}")
        if not region.crs_wkt:
            if src.height < self.patch_size or src.width < self.patch_size:
                raise S2DataError(
                    f"{path}: image of {src.height}x{src.width} px is smaller than patch_size={self.patch_size}"
                )
            region.height, region.width = src.height, src.width
            region.crs_wkt, region.transform = (src.crs.to_wkt() if src.crs else ""), src.transform
            if not region.crs_wkt:
                raise S2DataError(f"{path}: has no CRS")
            return
        reference = region.rgb_paths[0]
        if (src.height, src.width) != (region.height, region.width):
            raise S2DataError(
                f"{path}: size {src.height}x{src.width} differs from {region.height}x{region.width} of {reference}"
            )
        if src.crs is None or src.crs.to_wkt() != region.crs_wkt:
            raise S2DataError(f"{path}: CRS differs from that of {reference}")
        if not src.transform.almost_equals(region.transform):
            raise S2DataError(
                f"{path}: transform {tuple(src.transform)[:6]} differs from that of {reference}"
            )

    def _validate_rgb(self, region: RegionSeries, index: int) -> np.ndarray:
        """Check one RGB file completely and return its invalid-pixel mask."""
        path = region.rgb_paths[index]
        scale = self.reader.reflectance_scale
        try:
            with rasterio.open(path) as src:
                self._check_grid(region, path, src, RGB_BANDS)
                nodata = self.nodata if self.nodata is not None else src.nodata
                region.rgb_nodata[index] = nodata
                invalid = np.zeros((src.height, src.width), dtype=bool)
                outside = valid_count = 0
                brightest = -np.inf
                for row in range(0, src.height, VALIDATION_ROWS_PER_READ):
                    rows = min(VALIDATION_ROWS_PER_READ, src.height - row)
                    raw = src.read(window=Window(0, row, src.width, rows))
                    chunk_invalid = _pixel_invalid(raw, nodata)
                    invalid[row : row + rows] = chunk_invalid
                    values = raw[:, ~chunk_invalid].astype(np.float64) * scale
                    outside += int(((values < 0) | (values > 1)).any(axis=0).sum())
                    valid_count += values.shape[1]
                    if values.size:
                        brightest = max(brightest, float(values.max()))
        except RasterioError as exc:
            raise _open_error(path, exc) from exc
        if valid_count and outside / valid_count > self.max_saturated_fraction:
            raise S2DataError(
                f"{path}: {outside / valid_count:.1%} of valid pixels fall outside [0, 1] with "
                f"reflectance_scale={scale} (allowed max_saturated_fraction={self.max_saturated_fraction}); "
                "check reflectance_scale"
            )
        if valid_count and brightest < MIN_PLAUSIBLE_MAX_REFLECTANCE:
            raise S2DataError(
                f"{path}: brightest valid pixel is {brightest:.2e} with reflectance_scale={scale}; "
                "the image is blank or reflectance_scale is too small (check reflectance_scale and nodata)"
            )
        return invalid

    def _validate_embedding(self, region: RegionSeries, path: Path) -> np.ndarray:
        """Check one embedding file completely and return its invalid (NaN) mask."""
        try:
            with rasterio.open(path) as src:
                self._check_grid(region, path, src, EMBEDDING_BANDS)
                invalid = np.zeros((src.height, src.width), dtype=bool)
                for row in range(0, src.height, VALIDATION_ROWS_PER_READ):
                    rows = min(VALIDATION_ROWS_PER_READ, src.height - row)
                    raw = src.read(window=Window(0, row, src.width, rows))
                    invalid[row : row + rows] = _pixel_invalid(raw, None)
        except RasterioError as exc:
            raise _open_error(path, exc) from exc
        return invalid

    def _region_pairs(
        self, region: RegionSeries, want_crops: bool
    ) -> tuple[list[ForecastPair], list[np.ndarray]]:
        """Validate a region's files; return its pairs (oldest target first) and per-frame invalid masks."""
        frame_invalid = [self._validate_rgb(region, i) for i in range(len(region.times))]
        rows, cols = grid_offsets(region.height, self.patch_size), grid_offsets(region.width, self.patch_size)
        limit = self.max_invalid_fraction * self.patch_size**2
        pairs = []
        for target in range(self.history, len(region.times)):
            frames = list(range(target - self.history, target))
            invalid = np.logical_or.reduce([frame_invalid[i] for i in [*frames, target]])
            embedding_path = region.embedding_paths[target]
            if embedding_path is not None:
                invalid |= self._validate_embedding(region, embedding_path)
            counts = window_invalid_counts(invalid, self.patch_size)
            grid = [(r, c) for r in rows for c in cols if counts[r, c] <= limit]
            pair = ForecastPair(region, frames, target, grid, len(rows) * len(cols) - len(grid))
            allowed = counts <= limit
            if want_crops and not allowed.all():
                pair.allowed_offsets = np.packbits(allowed.ravel())
                pair.allowed_count = int(allowed.sum())
            pairs.append(pair)
        for path in region.embedding_paths[: self.history]:
            if path is not None:
                self._validate_embedding(region, path)
        return pairs, frame_invalid

    def _sequence_grid(
        self, region: RegionSeries, frame_invalid: list[np.ndarray]
    ) -> tuple[list[SequenceWindow], int]:
        """Grid windows where no frame exceeds the invalid threshold, and the number skipped."""
        limit = self.max_invalid_fraction * self.patch_size**2
        counts = [window_invalid_counts(mask, self.patch_size) for mask in frame_invalid]
        rows, cols = grid_offsets(region.height, self.patch_size), grid_offsets(region.width, self.patch_size)
        windows = [
            SequenceWindow(region, r, c)
            for r in rows
            for c in cols
            if all(count[r, c] <= limit for count in counts)
        ]
        return windows, len(rows) * len(cols) - len(windows)

    def _assign_regions(self, names: list[str]) -> dict[str, list[str]]:
        """Seeded region split: test (if test_fraction > 0), then val, then the rest for train."""
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(self.seed)).tolist()
        shuffled = [names[i] for i in order]
        n_test = max(1, round(self.test_fraction * len(names))) if self.test_fraction > 0 else 0
        n_val = max(1, round(self.val_fraction * len(names)))
        test, val = shuffled[:n_test], shuffled[n_test : n_test + n_val]
        train = shuffled[n_test + n_val :]
        if self.holdout_last_step:
            test = list(names)
        elif self.test_fraction == 0:
            test = val
        return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}

    def _build(self) -> None:
        """Discover, split and validate every file once; later ``setup`` calls reuse the result."""
        regions = self._discover()
        assignment = self._assign_regions([region.name for region in regions])
        split_pairs: dict[str, list[ForecastPair]] = {"train": [], "val": [], "test": []}
        self._sequence_windows = []
        summary = {split: SplitSummary(regions=names) for split, names in assignment.items()}
        for region in regions:
            in_train = region.name in assignment["train"]
            pairs, frame_invalid = self._region_pairs(region, want_crops=in_train)
            for split, names in assignment.items():
                if region.name not in names:
                    continue
                chosen = pairs
                if self.holdout_last_step:
                    chosen = pairs[-1:] if split == "test" else pairs[:-1]
                split_pairs[split].extend(chosen)
                summary[split].pairs += len(chosen)
                if not (split == "test" and self.sequence):
                    summary[split].windows += sum(len(p.grid) for p in chosen)
                    summary[split].skipped_windows += sum(p.skipped_windows for p in chosen)
            if self.sequence and region.name in assignment["test"]:
                windows, skipped = self._sequence_grid(region, frame_invalid)
                self._sequence_windows.extend(windows)
                summary["test"].windows += len(windows)
                summary["test"].skipped_windows += skipped
        self._split_pairs, self._summary = split_pairs, summary
        self._report()

    def _report(self) -> None:
        if self.holdout_last_step:
            test_note = "last time step of every region"
        elif self.test_fraction > 0:
            test_note = "its own regions"
        else:
            test_note = "the validation regions"
        lines = [f"S2 data at {self.root} (test split: {test_note}; sequence={self.sequence})"]
        for split, counts in self._summary.items():
            lines.append(
                f"  {split}: {len(counts.regions)} regions, {counts.pairs} pairs, {counts.windows} windows, "
                f"{counts.skipped_windows} windows skipped (invalid fraction > {self.max_invalid_fraction})"
            )
        if self._excluded:
            lines.append(f"  left out (too few time steps): {', '.join(self._excluded)}")
        rank_zero_info("\n".join(lines))
        skipped = {split: c.skipped_windows for split, c in self._summary.items() if c.skipped_windows}
        if skipped:
            warnings.warn(
                f"skipped windows over max_invalid_fraction={self.max_invalid_fraction}: {skipped}",
                stacklevel=2,
            )

    # ---- Lightning hooks -------------------------------------------------------------------------------------

    def _forecast_dataset(self, split: str) -> S2ForecastDataset:
        assert self._split_pairs is not None
        dataset = S2ForecastDataset(
            self._split_pairs[split], self.patch_size, self.reader, random_crop=split == "train"
        )
        if len(dataset) == 0:
            raise S2DataError(
                f"split '{split}' is empty: regions {self._summary[split].regions}, "
                f"{self._summary[split].skipped_windows} windows skipped (root={self.root})"
            )
        return dataset

    def _evaluation_dataset(self) -> S2ForecastDataset | S2SequenceDataset:
        if not self.sequence:
            return self._forecast_dataset("test")
        if not self._sequence_windows:
            raise S2DataError(
                f"split 'test' (sequence mode) is empty: regions {self._summary['test'].regions}"
            )
        return S2SequenceDataset(self._sequence_windows, self.patch_size, self.reader)

    def setup(self, stage: str) -> None:
        """Validate every file (first call only) and build the datasets the stage needs."""
        if self._split_pairs is None:
            self._build()
        if stage == "fit":
            self.train_dataset = self._forecast_dataset("train")
            if len(self.train_dataset) < self.batch_size:
                raise S2DataError(
                    f"split 'train' has {len(self.train_dataset)} windows, fewer than batch_size={self.batch_size} "
                    "(the last incomplete batch is dropped, so no step would run)"
                )
        if stage in ("fit", "validate"):
            self.val_dataset = self._forecast_dataset("val")
        if stage == "test":
            self.test_dataset = self._evaluation_dataset()
        if stage == "predict":
            self.predict_dataset = self._evaluation_dataset()

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Return the batch unchanged: reflectance is already scaled, so torchgeo's default /255 must not run."""
        return batch

    def dataset_summary(self) -> dict[str, Any]:
        """Per split: regions, pairs, windows and skipped windows; plus the regions left out (after setup)."""
        if self._split_pairs is None:
            raise RuntimeError("dataset_summary() needs setup() to have run")
        result: dict[str, Any] = {
            split: {
                "regions": list(c.regions),
                "pairs": c.pairs,
                "windows": c.windows,
                "skipped_windows": c.skipped_windows,
            }
            for split, c in self._summary.items()
        }
        result["excluded_regions"] = list(self._excluded)
        return result
