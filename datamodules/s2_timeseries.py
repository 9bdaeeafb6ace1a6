"""Sentinel-2 time-series forecasting data: RGB frames t-k+1..t -> frame t+1 (+ AlphaEarth embedding of t+1).

Layout (the Sat-JEPA-Diff dataset): ``<root>/<Region>/s2_rgb_<Region>_<YYYY>_10km.tif`` (3-band RGB) and,
optionally, ``<root>/<Region>/embedding_<Region>_<YYYY>_10km.tif`` (64-band AlphaEarth embedding, same grid).
Every file is read completely once and checked before training; what the check found is kept in a validation
manifest keyed by path, size and modification time, so later set-ups (test, predict, other DDP ranks, the next
run) read no pixels of unchanged files. Samples are lazy rasterio windowed reads. With ``embedding_patch_size``
p > 1 a sample carries the embedding averaged per p x p patch (what the model consumes), sliced from a pooled copy
that validation writes beside the manifest: 1/p**2 of the pixels and no decoding of the 64-band file. Splits
are by region (train, validation and test apart), never by window, so no region leaks across splits; only
consecutive time steps are paired.
"""

from __future__ import annotations

import base64
import bisect
import json
import os
import re
import resource
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from affine import Affine
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rasterio.errors import RasterioError
from rasterio.windows import Window
from torch import Tensor
from torch.utils.data import DataLoader, default_collate
from torchgeo.datamodules import NonGeoDataModule
from torchgeo.datasets import NonGeoDataset
from tqdm import tqdm

from fileio import atomic_open

RGB_BANDS = 3
EMBEDDING_BANDS = 64
# A file whose brightest valid pixel stays below this after scaling is almost surely scaled twice.
MIN_PLAUSIBLE_MAX_REFLECTANCE = 1e-3
# A file whose valid pixels average above reflectance 1 is mis-scaled (clouds and snow are bright, not the mean).
MAX_PLAUSIBLE_MEAN_REFLECTANCE = 1.0
VALIDATION_ROWS_PER_READ = 256
# Open GeoTIFF handles kept per process; capped below the process's file-descriptor limit.
MAX_OPEN_FILES = 2048
RESERVED_FILE_DESCRIPTORS = 256
MANIFEST_NAME = ".s2_validation_manifest.json"
POOLED_DIR_NAME = ".s2_pooled_embeddings"
MANIFEST_VERSION = 1
# Crop offsets drawn before falling back to an exact draw among the allowed ones (rejection sampling).
CROP_DRAWS = 64
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
    row_starts: list[int] = field(default_factory=list)
    col_starts: list[int] = field(default_factory=list)
    # Per time key, after validation: the embedding's invalid-pixel mask (None when it has none or no file) and
    # its pooled copy (None without pooling, without a file, or when the copy could not be written).
    embedding_invalid: list[np.ndarray | None] = field(default_factory=list)
    pooled_paths: list[Path | None] = field(default_factory=list)


@dataclass
class ForecastPair:
    """History frames ``frames`` of a region predicting frame ``target``, with the windows usable for it.

    ``grid`` holds the (row, col) offsets of the fixed grid windows that pass the invalid-pixel threshold;
    Training crops start at multiples of ``crop_stride`` (the embedding's pooling patch, so its patches line up
    with the pooled copy); ``allowed_offsets`` is a packed bit map over those offsets (None: all are allowed).
    """

    region: RegionSeries
    frames: list[int]
    target: int
    grid: list[tuple[int, int]]
    skipped_windows: int
    allowed_offsets: np.ndarray | None = None
    allowed_count: int = 0
    crop_stride: int = 1


@dataclass
class SequenceWindow:
    """A grid window of a run of consecutive time steps of a region (sequence mode)."""

    region: RegionSeries
    row: int
    col: int
    frames: list[int]


@dataclass
class SplitSummary:
    """Counts reported by :meth:`S2ForecastDataModule.dataset_summary`."""

    regions: list[str] = field(default_factory=list)
    pairs: int = 0
    windows: int = 0
    skipped_windows: int = 0
    gap_pairs: int = 0


def grid_offsets(length: int, patch_size: int) -> list[int]:
    """Window starts that tile ``length`` without gaps; the last window is aligned to the edge."""
    starts = list(range(0, length - patch_size + 1, patch_size))
    if starts[-1] + patch_size < length:
        starts.append(length - patch_size)
    return starts


def owned_extent(starts: list[int], start: int, length: int, patch_size: int) -> int:
    """How many leading pixels of the grid window at ``start`` it owns: up to the next window's start, so the
    pixels where an edge-aligned window overlaps its neighbour are scored once (by the later window)."""
    index = starts.index(start)
    end = starts[index + 1] if index + 1 < len(starts) else length
    return min(end - start, patch_size)


def natural_key(text: str) -> list[Any]:
    """Sort key treating digit runs as numbers, so time keys t2 < t10 and 2018 < 2019."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def time_number(time: str) -> int | None:
    """The last digit run of a time key (2019 for ``2019``, 3 for ``t3``), or None when it has none."""
    digits = re.findall(r"\d+", time)
    return int(digits[-1]) if digits else None


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


def pool_patches(array: np.ndarray, pool: int) -> np.ndarray:
    """(C, H, W) -> (C, H // pool, W // pool) float32 means of the pool x pool patches (a trailing partial patch
    row or column is dropped)."""
    channels, height, width = array.shape
    rows, cols = height // pool, width // pool
    patches = array[:, : rows * pool, : cols * pool].reshape(channels, rows, pool, cols, pool)
    return patches.mean(axis=(2, 4), dtype=np.float32)


def _open_error(path: Path, exc: Exception) -> S2DataError:
    return S2DataError(f"{path}: cannot read the file ({exc})")


def _pack_mask(mask: np.ndarray) -> str | None:
    """A bool mask as compressed text for the manifest; None when no pixel is set (the common case)."""
    if not mask.any():
        return None
    return base64.b64encode(zlib.compress(np.packbits(mask).tobytes(), 6)).decode("ascii")


def _unpack_mask(text: str | None, height: int, width: int) -> np.ndarray:
    if text is None:
        return np.zeros((height, width), dtype=bool)
    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    return np.unpackbits(bits, count=height * width).astype(bool).reshape(height, width)


def scan_file(
    path: Path,
    nodata: float | None,
    scale: float,
    offset: float,
    reflectance: bool,
    pooled_path: Path | None = None,
    pool: int = 1,
) -> dict[str, Any]:
    """Read one file completely (row blocks, float32) and summarise it: grid, invalid mask and, for RGB
    reflectance files, the valid-pixel statistics the plausibility checks need. With ``pooled_path`` it also
    writes the file's ``pool`` x ``pool`` patch means (invalid pixels as 0) there as ``.npy``."""
    rows_per_read = max(pool, VALIDATION_ROWS_PER_READ // pool * pool)
    pooled_blocks: list[np.ndarray] = []
    try:
        with rasterio.open(path) as src:
            record: dict[str, Any] = {
                "bands": src.count,
                "height": src.height,
                "width": src.width,
                "crs": src.crs.to_wkt() if src.crs else "",
                "transform": list(tuple(src.transform)[:6]),
            }
            nodata = nodata if nodata is not None else src.nodata
            if not reflectance:
                nodata = None
            invalid = np.zeros((src.height, src.width), dtype=bool)
            valid = below = above = 0
            total, brightest = 0.0, -np.inf
            for row in range(0, src.height, rows_per_read):
                rows = min(rows_per_read, src.height - row)
                raw = src.read(window=Window(0, row, src.width, rows))
                chunk_invalid = _pixel_invalid(raw, nodata)
                invalid[row : row + rows] = chunk_invalid
                if pooled_path is not None:
                    pixels = raw.astype(np.float32, copy=True)
                    pixels[:, chunk_invalid] = 0.0
                    pooled_blocks.append(pool_patches(pixels, pool))
                if not reflectance:
                    continue
                values = (raw[:, ~chunk_invalid].astype(np.float32) + np.float32(offset)) * np.float32(scale)
                below += int((values < 0).any(axis=0).sum())
                above += int((values > 1).any(axis=0).sum())
                valid += values.shape[1]
                if values.size:
                    total += float(values.sum(dtype=np.float64))
                    brightest = max(brightest, float(values.max()))
    except RasterioError as exc:
        raise _open_error(path, exc) from exc
    if pooled_path is not None:
        _write_pooled(pooled_path, np.concatenate(pooled_blocks, axis=1))
    record.update(invalid=_pack_mask(invalid), nodata=nodata)
    if reflectance:
        channels = max(record["bands"], 1)
        mean = total / (valid * channels) if valid else 0.0
        record.update(valid=valid, below=below, above=above, mean=mean, brightest=brightest)
    return record


def _write_pooled(path: Path, pooled: np.ndarray) -> None:
    """Save a pooled embedding atomically; a folder that cannot be written only costs a warning (full reads)."""
    try:
        with atomic_open(path, "wb") as stream:
            np.save(stream, pooled)
    except OSError as exc:
        warnings.warn(
            f"cannot write the pooled embedding {path} ({exc}); its samples are read and pooled at full "
            "resolution (set the DataModule's cache_dir to a writable folder)",
            stacklevel=2,
        )


class ValidationManifest:
    """What validation found per file, keyed by path and invalidated by a change of size, modification time or
    the settings the statistics depend on. Saved atomically (temporary file + rename) as JSON."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, Any] = {}
        self.changed = False
        try:
            content = json.loads(path.read_text())
            if content.get("version") == MANIFEST_VERSION:
                self.entries = content["files"]
        except (OSError, ValueError, KeyError, AttributeError):
            self.entries = {}

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def get(self, path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
        entry = self.entries.get(str(path))
        try:
            stamp = self._stamp(path)
        except OSError:
            return None
        if entry and entry["stamp"] == stamp and entry["settings"] == settings:
            return entry["record"]
        return None

    def put(self, path: Path, settings: dict[str, Any], record: dict[str, Any]) -> None:
        self.entries[str(path)] = {"stamp": self._stamp(path), "settings": settings, "record": record}
        self.changed = True

    def save(self) -> None:
        """Write the manifest if anything changed; a folder that cannot be written only costs a warning."""
        if not self.changed:
            return
        try:
            with atomic_open(self.path, "w") as file:
                json.dump({"version": MANIFEST_VERSION, "files": self.entries}, file)
            self.changed = False
        except OSError as exc:
            warnings.warn(
                f"cannot write the validation manifest {self.path} ({exc}); every setup will re-read the files "
                "(set the DataModule's cache_dir to a writable folder)",
                stacklevel=2,
            )


def open_file_limit(requested: int) -> int:
    """Handles one process may keep open: ``requested``, capped below the (raised if possible) descriptor limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = requested + RESERVED_FILE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < wanted and (hard == resource.RLIM_INFINITY or hard > soft):
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, soft - RESERVED_FILE_DESCRIPTORS))


class PixelReader:
    """Reads windows of validated files: applies offset and scale, clips to [0, 1], masks nodata/NaN to 0.

    Opening a GeoTIFF costs far more than reading a small window, so each process keeps its most recently
    used handles open, as many as the training files where the descriptor limit allows (GDAL handles are never
    shared across processes: a forked worker starts afresh).
    """

    def __init__(
        self, reflectance_scale: float, reflectance_offset: float = 0.0, max_open_files: int = MAX_OPEN_FILES
    ):
        self.reflectance_scale = reflectance_scale
        self.reflectance_offset = reflectance_offset
        self.max_open_files = max_open_files
        self._limit: int | None = None
        self._handles: OrderedDict[Path, Any] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": OrderedDict(), "_limit": None}

    def _handle(self, path: Path, open_file: Callable[[Path], Any]) -> Any:
        """The process's open handle of ``path`` (a rasterio dataset or a memory-mapped ``.npy``), LRU-cached."""
        if self._pid != os.getpid():
            self._handles, self._pid, self._limit = OrderedDict(), os.getpid(), None
        if self._limit is None:
            self._limit = open_file_limit(self.max_open_files)
        handle = self._handles.pop(path, None)
        if handle is None:
            handle = open_file(path)
            while len(self._handles) >= self._limit:
                evicted = self._handles.popitem(last=False)[1]
                if isinstance(evicted, rasterio.DatasetReader):
                    evicted.close()  # a memory map closes when its last reference goes
        self._handles[path] = handle
        return handle

    def _read(self, path: Path, window: Window) -> np.ndarray:
        return self._handle(path, rasterio.open).read(window=window)

    def read_pooled(self, path: Path, row: int, col: int, size: int, pool: int) -> Tensor:
        """The (64, size / pool, size / pool) patch means of the window at (row, col), both multiples of
        ``pool``, sliced from the pooled copy validation wrote (memory-mapped: no decoding)."""
        pooled = self._handle(path, lambda file: np.load(file, mmap_mode="r"))
        first_row, first_col, cells = row // pool, col // pool, size // pool
        return torch.from_numpy(
            np.array(pooled[:, first_row : first_row + cells, first_col : first_col + cells])
        )

    def read_rgb(
        self, path: Path, nodata: float | None, row: int, col: int, size: int
    ) -> tuple[Tensor, Tensor]:
        """Return the (3, size, size) reflectance in [0, 1] and the (size, size) validity mask."""
        raw = self._read(path, Window(col, row, size, size))
        invalid = _pixel_invalid(raw, nodata)
        scaled = raw.astype(np.float32)
        if self.reflectance_offset:
            scaled += np.float32(self.reflectance_offset)
        scaled *= np.float32(self.reflectance_scale)
        np.clip(scaled, 0.0, 1.0, out=scaled)
        scaled[:, invalid] = 0.0
        return torch.from_numpy(scaled), torch.from_numpy(~invalid)

    def read_history(
        self, region: RegionSeries, frames: list[int], row: int, col: int, size: int
    ) -> tuple[Tensor, Tensor]:
        """The ``(k, 3, size, size)`` history of ``frames`` at a window and where every frame is valid."""
        images, valid = [], torch.ones(size, size, dtype=torch.bool)
        for frame in frames:
            pixels, frame_valid = self.read_rgb(
                region.rgb_paths[frame], region.rgb_nodata[frame], row, col, size
            )
            images.append(pixels)
            valid &= frame_valid
        return torch.stack(images), valid

    def read_embedding(self, path: Path, row: int, col: int, size: int) -> tuple[Tensor, Tensor]:
        """Return the (64, size, size) embedding and its validity mask (NaN/Inf pixels are zeroed and invalid)."""
        raw = self._read(path, Window(col, row, size, size)).astype(np.float32, copy=False)
        finite = np.isfinite(raw)
        if finite.all():  # the common case: no per-pixel reduction over 64 bands
            return torch.from_numpy(raw), torch.ones(size, size, dtype=torch.bool)
        invalid = ~finite.all(axis=0)
        raw[:, invalid] = 0.0
        return torch.from_numpy(raw), torch.from_numpy(~invalid)


def _window_meta(region: RegionSeries, row: int, col: int, size: int) -> dict[str, Any]:
    """Region, CRS and the window's affine transform."""
    return {"region": region.name, "crs": region.crs_wkt, "transform": _shift(region.transform, row, col)}


def _shift(transform: Affine, row: int, col: int) -> tuple[float, ...]:
    """The 6 affine coefficients of a window starting at (row, col) (plain arithmetic, no deprecated path)."""
    a, b, c, d, e, f = tuple(transform)[:6]
    return (a, b, c + a * col + b * row, d, e, f + d * col + e * row)


def _owned(region: RegionSeries, row: int, col: int, size: int) -> Tensor:
    """``(size, size)`` True on the pixels the grid window at (row, col) owns (see ``owned_extent``)."""
    rows = owned_extent(region.row_starts, row, region.height, size)
    cols = owned_extent(region.col_starts, col, region.width, size)
    owned = torch.zeros(size, size, dtype=torch.bool)
    owned[:rows, :cols] = True
    return owned


def restrict_crops(pair: ForecastPair, allowed: np.ndarray) -> None:
    """Keep a pair's allowed crop offsets (``allowed``: every offset) on its ``crop_stride`` lattice; a pair whose
    allowed offsets all lie off the lattice crops at any of them (its embedding then read at full resolution)."""
    lattice = allowed[:: pair.crop_stride, :: pair.crop_stride]
    if not lattice.any():
        pair.crop_stride, lattice = 1, allowed
    if not lattice.all():
        pair.allowed_offsets = np.packbits(lattice.ravel())
        pair.allowed_count = int(lattice.sum())


class S2ForecastDataset(NonGeoDataset):
    """Forecasting samples (history -> t+1) over validated pairs; random crops or the fixed window grid.

    With ``random_crop`` each pair contributes as many samples per epoch as it has usable grid windows, and
    each sample is a crop among offsets under the invalid-pixel threshold drawn from a generator seeded by
    ``(seed, epoch, index)``: a sample's crop depends neither on the worker that loads it nor on restarts.
    A key is an index (the epoch is the one last given to ``set_epoch``) or an ``(epoch, index)`` pair
    (``takes_epoch_keys``), which survives persistent workers. Grid samples carry ``owned``, the pixels this
    window is scored on, so overlapping edge-aligned windows count each pixel once.
    """

    takes_epoch_keys = True

    def __init__(
        self,
        pairs: Sequence[ForecastPair],
        patch_size: int,
        reader: PixelReader,
        random_crop: bool,
        seed: int = 0,
        embedding_pool: int = 1,
    ):
        self.pairs = list(pairs)
        self.patch_size = patch_size
        self.embedding_pool = embedding_pool
        self.reader = reader
        self.random_crop = random_crop
        self.seed = seed
        self.epoch = 0
        self.has_embeddings = any(p.region.embedding_paths[p.target] is not None for p in self.pairs)
        self._ends = np.cumsum([len(pair.grid) for pair in self.pairs]).tolist()

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose crops integer keys draw (keys ``(epoch, index)`` carry their own)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def sample_generator(self, epoch: int, index: int) -> np.random.Generator:
        """The only source of randomness of sample ``index`` in ``epoch``."""
        return np.random.default_rng([self.seed % 2**63, epoch, index])

    def _locate(self, index: int, epoch: int) -> tuple[ForecastPair, int, int]:
        pair_index = bisect.bisect_right(self._ends, index)
        pair = self.pairs[pair_index]
        if not self.random_crop:
            start = self._ends[pair_index - 1] if pair_index else 0
            row, col = pair.grid[index - start]
            return pair, row, col
        stride = pair.crop_stride
        span_rows = (pair.region.height - self.patch_size) // stride + 1
        span_cols = (pair.region.width - self.patch_size) // stride + 1
        generator = self.sample_generator(epoch, index)
        if pair.allowed_offsets is None:
            flat = int(generator.integers(span_rows * span_cols))
            return pair, flat // span_cols * stride, flat % span_cols * stride
        bits = pair.allowed_offsets
        for flat in generator.integers(span_rows * span_cols, size=CROP_DRAWS).tolist():
            if (bits[flat >> 3] >> (7 - (flat & 7))) & 1:
                return pair, flat // span_cols * stride, flat % span_cols * stride
        allowed = np.unpackbits(bits, count=span_rows * span_cols).astype(bool)
        flat = int(np.flatnonzero(allowed)[int(generator.integers(pair.allowed_count))])
        return pair, flat // span_cols * stride, flat % span_cols * stride

    def _embedding(self, region: RegionSeries, index: int, row: int, col: int) -> tuple[Tensor, Tensor]:
        """Time ``index``'s embedding window, averaged per ``embedding_pool`` patch (invalid pixels count as 0 in
        a patch's mean, as when the model pools a full-resolution window), and its full-resolution validity."""
        size, pool = self.patch_size, self.embedding_pool
        pooled_path = region.pooled_paths[index] if region.pooled_paths else None
        if pooled_path is not None and row % pool == 0 and col % pool == 0:
            invalid = region.embedding_invalid[index]
            valid = (
                torch.ones(size, size, dtype=torch.bool)
                if invalid is None
                else torch.from_numpy(~invalid[row : row + size, col : col + size])
            )
            return self.reader.read_pooled(pooled_path, row, col, size, pool), valid
        embedding, valid = self.reader.read_embedding(region.embedding_paths[index], row, col, size)
        if pool > 1:
            embedding = torch.from_numpy(pool_patches(embedding.numpy(), pool))
        return embedding, valid

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        pair, row, col = self._locate(index, epoch)
        region, size = pair.region, self.patch_size
        history, valid = self.reader.read_history(region, pair.frames, row, col, size)
        target, target_valid = self.reader.read_rgb(
            region.rgb_paths[pair.target], region.rgb_nodata[pair.target], row, col, size
        )
        valid &= target_valid
        sample: dict[str, Any] = {"image": history, "target": target}
        embedding_path = region.embedding_paths[pair.target]
        if embedding_path is not None:
            sample["embedding"], embedding_valid = self._embedding(region, pair.target, row, col)
            valid &= embedding_valid
        owned = (
            torch.ones(size, size, dtype=torch.bool) if self.random_crop else _owned(region, row, col, size)
        )
        return {
            **sample,
            "mask": valid,
            "owned": owned,
            "has_embedding": torch.tensor(embedding_path is not None),
            "time": region.times[pair.frames[-1]],
            "target_time": region.times[pair.target],
            **_window_meta(region, row, col, size),
        }

    def __str__(self) -> str:
        mode = "random crops" if self.random_crop else "grid windows"
        return f"S2ForecastDataset: {len(self.pairs)} pairs, {len(self)} samples ({mode} of {self.patch_size} px)"


class S2SequenceDataset(NonGeoDataset):
    """Runs of consecutive time steps of grid windows, for autoregressive rollouts; ``mask`` is per frame."""

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
            self.reader.read_rgb(region.rgb_paths[i], region.rgb_nodata[i], window.row, window.col, size)
            for i in window.frames
        ]
        return {
            "images": torch.stack([pixels for pixels, _ in reads]),
            "mask": torch.stack([valid for _, valid in reads]),
            "owned": _owned(region, window.row, window.col, size),
            "times": [region.times[i] for i in window.frames],
            **_window_meta(region, window.row, window.col, size),
        }

    def __str__(self) -> str:
        return f"S2SequenceDataset: {len(self)} windows of {self.patch_size} px"


def collate_s2(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep region/time/crs/transform (and sequence ``times``) as plain per-sample lists.

    ``embedding`` is only in the batch when a sample of it has one; then samples without one get zeros
    (``has_embedding`` False), so a dataset without embedding files never builds the 64-band placeholder.
    """
    with_embedding = [s for s in samples if "embedding" in s]
    if with_embedding and len(with_embedding) < len(samples):
        zeros = torch.zeros_like(with_embedding[0]["embedding"])
        samples = [s if "embedding" in s else {**s, "embedding": zeros} for s in samples]
    batch = default_collate([{k: v for k, v in s.items() if k not in LIST_KEYS} for s in samples])
    for key in LIST_KEYS:
        if key in samples[0]:
            batch[key] = [sample[key] for sample in samples]
    return batch


class EpochDataLoader(DataLoader):
    """A DataLoader that gives its dataset the trainer's epoch (``set_epoch``) whenever an epoch's iteration
    starts, so integer keys draw that epoch's crops (workers are not persistent, so they see the new epoch)."""

    def __init__(self, *args: Any, epoch: Callable[[], int], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.epoch = epoch

    def __iter__(self) -> Any:
        self.dataset.set_epoch(self.epoch())
        return super().__iter__()


class S2ForecastDataModule(NonGeoDataModule):
    """Sentinel-2 forecasting DataModule (see ``docs/DESIGN.md``, forecasting batch).

    Splits regions (seeded) into train, validation and test: the checkpoint is chosen on validation regions
    that the reported test never sees. ``test_fraction=0`` is the paper's 80/20 split, where test is the
    validation regions (warned). ``holdout_last_step`` instead uses the last pair of every region (target = last
    time key) as the test set and removes it from train/val (needs ``test_fraction=0``; not with ``sequence``,
    whose rollouts would run through training targets). Only consecutive time steps are paired (``time_step``);
    pairs across a gap are dropped and counted. ``sequence`` makes the test/predict datasets yield runs of
    consecutive time steps (one run per batch: lengths may differ).

    Validation reads every file once and keeps what it found in a manifest (``cache_dir``, default the data
    root), keyed by path, size and modification time; ``prepare_data`` (one process per node under DDP) fills
    it, so ``setup`` on every rank and every later run reads no pixels of unchanged files.

    Args:
        root: dataset folder holding one sub-folder per region.
        reflectance_scale: factor from stored values to reflectance in [0, 1] (1e-4 for S2 L2A digital numbers,
            1.0 for stored reflectance); checked on every file at setup.
        reflectance_offset: added to stored values before scaling (-1000 for L2A of processing baseline 04.00
            and later, whose digital numbers carry +1000); negative results clip to 0.
        patch_size: window size in pixels.
        history: number of input frames k (>= 1).
        rgb_pattern, embedding_pattern: file-name templates inside a region folder, with ``{region}`` and
            ``{time}``; ``embedding_pattern=None`` disables embeddings.
        time_regex: regex a time key must match (``\\d{4}`` for years); keys sort naturally (t2 < t10).
        time_step: difference of the numbers in consecutive time keys (1 for years: 2018 -> 2019); pairs
            across a larger gap are dropped and counted. None turns the check off (keys without numbers).
        nodata: raw value marking missing pixels; None uses each file's own nodata tag. NaN is always invalid.
        max_invalid_fraction: windows with a larger fraction of invalid pixels are skipped (and counted).
        max_saturated_fraction: fraction of a file's valid pixels allowed outside [0, 1] after scaling (bright
            clouds, snow: clipped and counted); more stops setup. A file whose mean exceeds 1 is mis-scaled.
        val_fraction, test_fraction: fractions of regions for validation and test (seeded by ``seed``).
        cache_dir: folder of the validation manifest (default: the data root; a read-only root only warns).
        max_open_files: GeoTIFF handles each loading process keeps open (capped by the descriptor limit).
        embedding_patch_size: p > 1 makes ``embedding`` the AlphaEarth embedding averaged per p x p patch,
            ``(64, patch_size / p, patch_size / p)``, instead of per pixel (1); set it to the I-JEPA encoder's
            patch size (the model pools the rest). Validation writes each embedding file's pooled copy beside the
            manifest, so a sample reads 1/p**2 of the values; training crops then start at multiples of p.
        predict_mode: ``scene`` (default) forecasts every region's whole scene from its last ``history`` frames
            (``datamodules.scenes``, written by ``callbacks.MosaicWriter``); ``pairs`` predicts the test pairs.
        predict_overlap, predict_horizon: scene mode's window overlap in pixels (None: ``patch_size // 4``) and
            forecast steps.
    """

    def __init__(
        self,
        root: str,
        *,
        reflectance_scale: float,
        reflectance_offset: float = 0.0,
        patch_size: int = 128,
        history: int = 1,
        batch_size: int = 8,
        num_workers: int = 0,
        rgb_pattern: str = "s2_rgb_{region}_{time}_10km.tif",
        embedding_pattern: str | None = "embedding_{region}_{time}_10km.tif",
        time_regex: str = r"\d{4}",
        time_step: int | None = 1,
        nodata: float | None = None,
        max_invalid_fraction: float = 0.1,
        max_saturated_fraction: float = 0.2,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        holdout_last_step: bool = False,
        seed: int = 0,
        sequence: bool = False,
        cache_dir: str | None = None,
        max_open_files: int = MAX_OPEN_FILES,
        embedding_patch_size: int = 1,
        predict_mode: str = "scene",
        predict_overlap: int | None = None,
        predict_horizon: int = 1,
    ) -> None:
        super().__init__(S2ForecastDataset, batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        checks = {
            "reflectance_scale": (reflectance_scale, reflectance_scale > 0),
            "patch_size": (patch_size, patch_size >= 1),
            "history": (history, history >= 1),
            "time_step": (time_step, time_step is None or time_step >= 1),
            "max_invalid_fraction": (max_invalid_fraction, 0.0 <= max_invalid_fraction <= 1.0),
            "max_saturated_fraction": (max_saturated_fraction, 0.0 <= max_saturated_fraction <= 1.0),
            "val_fraction": (val_fraction, 0.0 < val_fraction < 1.0),
            "test_fraction": (
                test_fraction,
                0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0,
            ),
            "max_open_files": (max_open_files, max_open_files >= 1),
            "batch_size": (batch_size, batch_size >= 1),
            "num_workers": (num_workers, num_workers >= 0),
            "embedding_patch_size": (embedding_patch_size, embedding_patch_size >= 1),
            "predict_mode": (predict_mode, predict_mode in ("scene", "pairs")),
            "predict_overlap": (predict_overlap, 0 <= (predict_overlap or 0) < patch_size),
            "predict_horizon": (predict_horizon, predict_horizon >= 1),
        }
        for key, (value, ok) in checks.items():
            if not ok:
                raise S2DataError(f"config key data.init_args.{key} has an invalid value: {value!r}")
        if patch_size % embedding_patch_size:
            raise S2DataError(
                f"config key data.init_args.embedding_patch_size={embedding_patch_size} must divide "
                f"data.init_args.patch_size={patch_size}"
            )
        if holdout_last_step and test_fraction > 0:
            raise S2DataError(
                "holdout_last_step and test_fraction > 0 both define the test set; with holdout_last_step: true "
                "set test_fraction: 0"
            )
        if holdout_last_step and sequence:
            raise S2DataError(
                "holdout_last_step and sequence cannot be combined: rollouts run over every time step, so their "
                "early steps would be training targets; use a region test split (test_fraction > 0) for rollouts"
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
        self.time_step = time_step
        self.nodata = nodata
        self.max_invalid_fraction = max_invalid_fraction
        self.max_saturated_fraction = max_saturated_fraction
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.holdout_last_step = holdout_last_step
        self.seed = seed
        self.sequence = sequence
        self.manifest_path = (Path(cache_dir) if cache_dir else self.root) / MANIFEST_NAME
        self.pooled_dir = self.manifest_path.parent / POOLED_DIR_NAME
        self.embedding_patch_size = embedding_patch_size
        self.reader = PixelReader(reflectance_scale, reflectance_offset, max_open_files)
        self.collate_fn = collate_s2
        if sequence:
            self.test_batch_size = 1
            self.predict_batch_size = 1
        self._split_pairs: dict[str, list[ForecastPair]] | None = None
        self._sequence_windows: list[SequenceWindow] = []
        self._summary: dict[str, SplitSummary] = {}
        self._excluded: list[str] = []
        self._clipped: dict[str, float] = {}
        self._gaps: list[str] = []

    # ---- discovery and validation -------------------------------------------------------------------------

    def _discover(self, history_only: bool = False) -> list[RegionSeries]:
        """Find region folders and their time keys; regions too short for one sample are warned about and left out
        (a training pair needs ``history + 1`` steps; ``history_only``, a forecast of the future, ``history``)."""
        needed = self.history if history_only else self.history + 1
        sample = (
            f"a forecast needs history={needed}" if history_only else f"a sample needs history+1={needed}"
        )
        if not self.root.is_dir():
            raise S2DataError(f"config key root: {self.root} is not a directory")
        regions, self._excluded = [], []
        # hidden folders are never regions: the pooled-embedding cache (.s2_pooled_embeddings) lives in the root
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            rgb_regex = _pattern_regex(self.rgb_pattern, folder.name, self.time_regex)
            found: dict[str, Path] = {}
            for path in sorted(folder.iterdir()):
                match = rgb_regex.fullmatch(path.name)
                if match:
                    found[match["time"]] = path
            times = sorted(found, key=natural_key)
            if len(times) < needed:
                self._excluded.append(folder.name)
                warnings.warn(
                    f"region {folder.name} ({folder}) has {len(times)} time step(s) matching rgb_pattern="
                    f"{self.rgb_pattern!r}, time_regex={self.time_regex!r}; {sample}: region left out",
                    stacklevel=2,
                )
                continue
            if self.time_step is not None:
                for time in times:
                    if time_number(time) is None:
                        raise S2DataError(
                            f"{found[time]}: time key {time!r} has no number to check consecutive steps "
                            "(config key time_step); set time_step: null to pair keys in sorted order"
                        )
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

    def _rgb_settings(self) -> dict[str, Any]:
        reader = self.reader
        return {
            "kind": "rgb",
            "scale": reader.reflectance_scale,
            "offset": reader.reflectance_offset,
            "nodata": self.nodata,
        }

    def _files(self, regions: list[RegionSeries]) -> list[tuple[Path, bool]]:
        """Every file of the regions as (path, is RGB)."""
        files = []
        for region in regions:
            files += [(path, True) for path in region.rgb_paths]
            files += [(path, False) for path in region.embedding_paths if path is not None]
        return files

    def _records(self, regions: list[RegionSeries]) -> dict[Path, dict[str, Any]]:
        """Validation records of every file: from the manifest when unchanged, else read now (with progress)."""
        manifest = ValidationManifest(self.manifest_path)
        rgb_settings, embedding_settings = self._rgb_settings(), {"kind": "embedding"}
        if self.embedding_patch_size > 1:
            embedding_settings["pool"] = self.embedding_patch_size
        records, missing = {}, []
        for path, is_rgb in self._files(regions):
            record = manifest.get(path, rgb_settings if is_rgb else embedding_settings)
            pooled = None if is_rgb else self._pooled_path(path)
            if record is None or (pooled is not None and not pooled.exists()):
                missing.append((path, is_rgb))
            else:
                records[path] = record
        if missing:
            reader = self.reader
            # One bar, on the first process only (None: shown on a terminal, hidden in logs).
            hidden = True if rank_zero_only.rank else None
            progress = tqdm(
                missing, desc=f"validating S2 files under {self.root}", unit="file", disable=hidden
            )
            for path, is_rgb in progress:
                record = scan_file(
                    path,
                    self.nodata,
                    reader.reflectance_scale,
                    reader.reflectance_offset,
                    is_rgb,
                    pooled_path=None if is_rgb else self._pooled_path(path),
                    pool=self.embedding_patch_size,
                )
                records[path] = record
                manifest.put(path, rgb_settings if is_rgb else embedding_settings, record)
            manifest.save()
        return records

    def _pooled_path(self, path: Path) -> Path | None:
        """Where validation keeps the patch-averaged copy of an embedding file (None without pooling)."""
        if self.embedding_patch_size == 1:
            return None
        relative = path.relative_to(self.root)
        return self.pooled_dir / relative.parent / f"{relative.stem}.pool{self.embedding_patch_size}.npy"

    def _check_grid(self, region: RegionSeries, path: Path, record: dict[str, Any], bands: int) -> None:
        if record["bands"] != bands:
            raise S2DataError(f"{path}: has {record['bands']} bands, expected {bands}")
        height, width, crs = record["height"], record["width"], record["crs"]
        transform = Affine(*record["transform"])
        if not region.crs_wkt:
            if height < self.patch_size or width < self.patch_size:
                raise S2DataError(
                    f"{path}: image of {height}x{width} px is smaller than patch_size={self.patch_size}"
                )
            if not crs:
                raise S2DataError(f"{path}: has no CRS")
            region.height, region.width, region.crs_wkt, region.transform = height, width, crs, transform
            region.row_starts = grid_offsets(height, self.patch_size)
            region.col_starts = grid_offsets(width, self.patch_size)
            return
        reference = region.rgb_paths[0]
        if (height, width) != (region.height, region.width):
            raise S2DataError(
                f"{path}: size {height}x{width} differs from {region.height}x{region.width} of {reference}"
            )
        if crs != region.crs_wkt:
            raise S2DataError(f"{path}: CRS differs from that of {reference}")
        if not transform.almost_equals(region.transform):
            raise S2DataError(f"{path}: transform {tuple(transform)[:6]} differs from that of {reference}")

    def _check_reflectance(self, path: Path, record: dict[str, Any]) -> None:
        """Stop on a mis-scaled file; a few bright (or, after the offset, negative) pixels are clipped and counted."""
        reader, valid = self.reader, record["valid"]
        if not valid:
            return
        keys = f"reflectance_scale={reader.reflectance_scale}, reflectance_offset={reader.reflectance_offset}"
        if record["mean"] > MAX_PLAUSIBLE_MEAN_REFLECTANCE:
            raise S2DataError(
                f"{path}: mean reflectance of valid pixels is {record['mean']:.3g} with {keys}; the file is "
                "mis-scaled (check reflectance_scale and reflectance_offset)"
            )
        outside = (record["below"] + record["above"]) / valid
        if outside > self.max_saturated_fraction:
            raise S2DataError(
                f"{path}: {outside:.1%} of valid pixels fall outside [0, 1] with {keys} (allowed "
                f"max_saturated_fraction={self.max_saturated_fraction}); check reflectance_scale"
            )
        if record["brightest"] < MIN_PLAUSIBLE_MAX_REFLECTANCE:
            raise S2DataError(
                f"{path}: brightest valid pixel is {record['brightest']:.2e} with {keys}; the image is blank or "
                "reflectance_scale is too small (check reflectance_scale and nodata)"
            )
        if outside:
            self._clipped[str(path)] = outside

    def _validate_region(
        self, region: RegionSeries, records: dict[Path, dict[str, Any]]
    ) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """Check a region's files from their records; return per-frame RGB and embedding invalid masks."""
        frame_invalid = []
        for index, path in enumerate(region.rgb_paths):
            record = records[path]
            self._check_grid(region, path, record, RGB_BANDS)
            self._check_reflectance(path, record)
            region.rgb_nodata[index] = record["nodata"]
            frame_invalid.append(_unpack_mask(record["invalid"], region.height, region.width))
        embedding_invalid: list[np.ndarray | None] = []
        for path in region.embedding_paths:
            if path is None:
                embedding_invalid.append(None)
                continue
            record = records[path]
            self._check_grid(region, path, record, EMBEDDING_BANDS)
            embedding_invalid.append(_unpack_mask(record["invalid"], region.height, region.width))
        if self.embedding_patch_size > 1:  # what a sample needs to skip the full-resolution read
            region.embedding_invalid = [
                None if path is None or records[path]["invalid"] is None else mask
                for path, mask in zip(region.embedding_paths, embedding_invalid, strict=True)
            ]
            pooled = [None if path is None else self._pooled_path(path) for path in region.embedding_paths]
            region.pooled_paths = [path if path is not None and path.exists() else None for path in pooled]
        return frame_invalid, embedding_invalid

    def _consecutive(self, region: RegionSeries, first: int, last: int) -> bool:
        """True when the time keys ``first..last`` of the region follow each other at ``time_step``."""
        if self.time_step is None:
            return True
        numbers = [time_number(region.times[i]) for i in range(first, last + 1)]
        return all(b - a == self.time_step for a, b in zip(numbers, numbers[1:], strict=False))

    def _region_pairs(
        self,
        region: RegionSeries,
        frame_invalid: list[np.ndarray],
        embedding_invalid: list[np.ndarray | None],
        want_crops: bool,
    ) -> tuple[list[ForecastPair], int]:
        """A region's pairs of consecutive steps (oldest target first) and how many pairs a gap dropped."""
        rows, cols = region.row_starts, region.col_starts
        limit = self.max_invalid_fraction * self.patch_size**2
        pairs, gaps = [], 0
        for target in range(self.history, len(region.times)):
            frames = list(range(target - self.history, target))
            if not self._consecutive(region, frames[0], target):
                gaps += 1
                self._gaps.append(f"{region.name}: {region.times[frames[0]]}..{region.times[target]}")
                continue
            masks = [frame_invalid[i] for i in [*frames, target]]
            if embedding_invalid[target] is not None:
                masks.append(embedding_invalid[target])
            invalid = np.logical_or.reduce(masks)
            stride = self.embedding_patch_size
            if not invalid.any():
                grid = [(r, c) for r in rows for c in cols]
                pairs.append(ForecastPair(region, frames, target, grid, 0, crop_stride=stride))
                continue
            counts = window_invalid_counts(invalid, self.patch_size)
            grid = [(r, c) for r in rows for c in cols if counts[r, c] <= limit]
            skipped = len(rows) * len(cols) - len(grid)
            pair = ForecastPair(region, frames, target, grid, skipped, crop_stride=stride)
            if want_crops:
                restrict_crops(pair, counts <= limit)
            pairs.append(pair)
        return pairs, gaps

    def _sequence_grid(
        self, region: RegionSeries, frame_invalid: list[np.ndarray]
    ) -> tuple[list[SequenceWindow], int]:
        """Grid windows of each run of consecutive steps (long enough for a rollout) where no frame exceeds the
        invalid threshold, and the number skipped."""
        runs, start = [], 0
        for index in range(1, len(region.times) + 1):
            if index == len(region.times) or not self._consecutive(region, index - 1, index):
                if index - start >= self.history + 1:
                    runs.append(list(range(start, index)))
                start = index
        limit = self.max_invalid_fraction * self.patch_size**2
        counts = [window_invalid_counts(mask, self.patch_size) for mask in frame_invalid]
        windows, skipped = [], 0
        for run in runs:
            for r in region.row_starts:
                for c in region.col_starts:
                    if all(counts[i][r, c] <= limit for i in run):
                        windows.append(SequenceWindow(region, r, c, run))
                    else:
                        skipped += 1
        return windows, skipped

    def _assign_regions(self, names: list[str]) -> dict[str, list[str]]:
        """Seeded region split: val, then test (if test_fraction > 0), then the rest for train."""
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(self.seed)).tolist()
        shuffled = [names[i] for i in order]
        n_val = max(1, round(self.val_fraction * len(names)))
        n_test = max(1, round(self.test_fraction * len(names))) if self.test_fraction > 0 else 0
        val, test = shuffled[:n_val], shuffled[n_val : n_val + n_test]
        train = shuffled[n_val + n_test :]
        if self.holdout_last_step:
            test = list(names)
        elif self.test_fraction == 0:
            test = val
        return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}

    def prepare_data(self) -> None:
        """Validate every file once into the manifest (Lightning runs this on one process per node)."""
        trainer = self.trainer
        scenes = (
            trainer is not None and trainer.state.fn == "predict" and self.hparams.predict_mode == "scene"
        )
        self._records(self._discover(history_only=scenes))

    def _build(self) -> None:
        """Discover, split and check every file; later ``setup`` calls reuse the result."""
        regions = self._discover()
        records = self._records(regions)
        assignment = self._assign_regions([region.name for region in regions])
        split_pairs: dict[str, list[ForecastPair]] = {"train": [], "val": [], "test": []}
        self._sequence_windows, self._clipped, self._gaps = [], {}, []
        summary = {split: SplitSummary(regions=names) for split, names in assignment.items()}
        for region in regions:
            frame_invalid, embedding_invalid = self._validate_region(region, records)
            in_train = region.name in assignment["train"]
            pairs, gaps = self._region_pairs(region, frame_invalid, embedding_invalid, want_crops=in_train)
            for split, names in assignment.items():
                if region.name not in names:
                    continue
                chosen = pairs
                if self.holdout_last_step:
                    is_last = [p.target == len(region.times) - 1 for p in pairs]
                    chosen = [p for p, last in zip(pairs, is_last, strict=True) if last == (split == "test")]
                split_pairs[split].extend(chosen)
                summary[split].pairs += len(chosen)
                summary[split].gap_pairs += gaps
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
            warnings.warn(
                "test_fraction: 0 makes the test split the validation regions: the best checkpoint is chosen "
                "on the regions that are then reported (the paper's 80/20 split); set test_fraction > 0 for a "
                "test set apart",
                stacklevel=2,
            )
        lines = [f"S2 data at {self.root} (test split: {test_note}; sequence={self.sequence})"]
        for split, counts in self._summary.items():
            lines.append(
                f"  {split}: {len(counts.regions)} regions, {counts.pairs} pairs, {counts.windows} windows, "
                f"{counts.skipped_windows} windows skipped (invalid fraction > {self.max_invalid_fraction}), "
                f"{counts.gap_pairs} pairs dropped at gaps"
            )
        if self._excluded:
            lines.append(f"  left out (too few time steps): {', '.join(self._excluded)}")
        if self._clipped:
            worst = max(self._clipped.values())
            lines.append(
                f"  {len(self._clipped)} files with pixels outside [0, 1] clipped (at most {worst:.2%})"
            )
        rank_zero_info("\n".join(lines))
        skipped = {split: c.skipped_windows for split, c in self._summary.items() if c.skipped_windows}
        if skipped:
            warnings.warn(
                f"skipped windows over max_invalid_fraction={self.max_invalid_fraction}: {skipped}",
                stacklevel=2,
            )
        if self._gaps:
            warnings.warn(
                f"{len(self._gaps)} pairs across a gap of more than time_step={self.time_step} dropped: "
                f"{', '.join(self._gaps[:10])}{' ...' if len(self._gaps) > 10 else ''}",
                stacklevel=2,
            )

    # ---- Lightning hooks -------------------------------------------------------------------------------------

    def _forecast_dataset(self, split: str) -> S2ForecastDataset:
        assert self._split_pairs is not None
        dataset = S2ForecastDataset(
            self._split_pairs[split],
            self.patch_size,
            self.reader,
            random_crop=split == "train",
            seed=self.seed,
            embedding_pool=self.embedding_patch_size,
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
        """Check every file (first call only; pixels are read only for files the manifest lacks) and build the
        datasets the stage needs."""
        if stage == "predict" and self.hparams.predict_mode == "scene":
            from datamodules.scenes import scene_dataset  # builds on this module

            self.predict_dataset, self.predict_batch_size = scene_dataset(self), self.batch_size
            return
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

    def current_epoch(self) -> int:
        """The trainer's epoch (0 without a trainer): the epoch of integer training keys."""
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        """Shuffled, last incomplete batch dropped; the dataset learns each epoch as its iteration starts."""
        return EpochDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            drop_last=True,
            epoch=self.current_epoch,
        )

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Return the batch unchanged: reflectance is already scaled, so torchgeo's default /255 must not run."""
        return batch

    def dataset_summary(self) -> dict[str, Any]:
        """Per split: regions, pairs, windows, skipped windows and pairs dropped at gaps; plus the regions left
        out and the files with clipped pixels (fraction of their valid pixels), after setup."""
        if self._split_pairs is None:
            raise RuntimeError("dataset_summary() needs setup() to have run")
        result: dict[str, Any] = {
            split: {
                "regions": list(c.regions),
                "pairs": c.pairs,
                "windows": c.windows,
                "skipped_windows": c.skipped_windows,
                "gap_pairs": c.gap_pairs,
            }
            for split, c in self._summary.items()
        }
        result["excluded_regions"] = list(self._excluded)
        result["clipped_files"] = dict(self._clipped)
        return result
