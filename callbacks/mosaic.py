"""Prediction writer: window forecasts blended into one Cloud-Optimized GeoTIFF per region and forecast step.

Each window's forecast is added, weighted by a feathered ramp over the overlap (times its validity mask), into a
disk-backed float32 accumulator (an uncompressed tiled GeoTIFF beside the output: three weighted sums per forecast
step and one weight band). Once every window of a region has arrived, each step's mosaic (sums / weight) goes block
by block into a tiled GeoTIFF that GDAL's COG driver copies (tiled, compressed, overviews) to
``<region>_<forecast time>.tif``, written atomically, with the input's CRS, transform and band descriptions. So
memory is bounded by the window batch and GDAL's block cache (``GDAL_CACHEMAX``), never by the scene.

Batches without scene metadata (``predict_mode: pairs``) are written one float32 GeoTIFF per window, named
``<region>_<target time>_<x>_<y>.tif`` by the window's origin.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from rasterio.windows import Window

from callbacks.images import run_directory
from fileio import atomic_path

OUTPUTS = ("reflectance", "digital_numbers")
ACCUMULATOR_BLOCK = 256


def feather_weights(patch_size: int, overlap: int) -> np.ndarray:
    """``(P, P)`` separable ramp: 1 inside, falling linearly over the ``overlap`` outermost pixels to
    ``1 / (overlap + 1)``, so neighbouring windows cross-fade while a pixel only one window covers keeps that
    window's value exactly (the blend divides by the summed weight)."""
    distance = np.minimum(np.arange(patch_size), np.arange(patch_size)[::-1]) + 1
    ramp = np.minimum(distance / (overlap + 1), 1.0)
    return np.outer(ramp, ramp).astype(np.float32)


def to_digital_numbers(
    reflectance: np.ndarray, valid: np.ndarray, scene: dict[str, Any], nodata: float
) -> np.ndarray:
    """Reflectance back to the input's stored values (``/ reflectance_scale - reflectance_offset``), rounded and
    clipped to its data type; a valid pixel landing on the nodata value is moved one step off it."""
    dtype = np.dtype(scene["dtype"])
    values = reflectance / scene["reflectance_scale"] - scene["reflectance_offset"]
    if np.issubdtype(dtype, np.integer):
        limits = np.iinfo(dtype)
        values = np.clip(np.rint(values), limits.min, limits.max)
        step = 1 if nodata < limits.max else -1
        values[(values == nodata) & valid[None]] = nodata + step
    return values.astype(dtype)


class SceneMosaic:
    """One region's blend in progress: the accumulator file and how many of the scene's windows it holds."""

    def __init__(self, scene: dict[str, Any], crs: str, work_dir: Path):
        self.scene, self.crs, self.work_dir = scene, crs, work_dir
        self.steps = len(scene["forecast_times"])
        self.windows_added = 0
        self.weights = feather_weights(scene["patch_size"], scene["overlap"])
        self.accumulator = rasterio.open(
            work_dir / "accumulator.tif",
            "w+",
            driver="GTiff",
            width=scene["width"],
            height=scene["height"],
            count=3 * self.steps + 1,
            dtype="float32",
            crs=crs,
            transform=Affine(*scene["transform"]),
            tiled=True,
            blockxsize=ACCUMULATOR_BLOCK,
            blockysize=ACCUMULATOR_BLOCK,
            interleave="pixel",
        )

    @property
    def complete(self) -> bool:
        return self.windows_added == self.scene["windows"]

    def add(self, row: int, col: int, forecast: np.ndarray, valid: np.ndarray) -> None:
        """Add a window's ``(steps, 3, P, P)`` forecast, weighted by the feather ramp on its valid pixels."""
        size = forecast.shape[-1]
        window = Window(col, row, size, size)
        weight = self.weights * valid
        totals = self.accumulator.read(window=window)
        totals[:-1] += forecast.reshape(-1, size, size) * weight
        totals[-1] += weight
        self.accumulator.write(totals, window=window)
        self.windows_added += 1

    def write(self, folder: Path, region: str, output: str, cog_options: dict[str, Any]) -> list[Path]:
        """Write each step's mosaic as ``<region>_<forecast time>.tif`` (COG) and remove the work folder."""
        scene = self.scene
        reflectance = output == "reflectance"
        nodata = float("nan") if reflectance else scene["nodata"]
        if nodata is None:  # uncovered pixels (skipped windows, limit_predict_batches) still need a mark
            nodata = float("nan") if np.issubdtype(np.dtype(scene["dtype"]), np.floating) else 0
        profile = {
            "driver": "GTiff",
            "width": scene["width"],
            "height": scene["height"],
            "count": 3,
            "dtype": "float32" if reflectance else scene["dtype"],
            "crs": self.crs,
            "transform": Affine(*scene["transform"]),
            "nodata": nodata,
            "tiled": True,
            "blockxsize": ACCUMULATOR_BLOCK,
            "blockysize": ACCUMULATOR_BLOCK,
        }
        staged = [self.work_dir / f"step_{step}.tif" for step in range(self.steps)]
        outputs = [rasterio.open(path, "w", **profile) for path in staged]
        try:
            for _, window in self.accumulator.block_windows(1):
                totals = self.accumulator.read(window=window)
                weight = totals[-1]
                valid = weight > 0
                for step, dst in enumerate(outputs):
                    mosaic = totals[3 * step : 3 * step + 3] / np.where(valid, weight, 1.0)
                    if not reflectance:
                        mosaic = to_digital_numbers(mosaic, valid, scene, nodata)
                    mosaic[:, ~valid] = nodata
                    dst.write(mosaic, window=window)
            for dst in outputs:
                for band, description in enumerate(scene["descriptions"], start=1):
                    if description:
                        dst.set_band_description(band, description)
        finally:
            for dst in outputs:
                dst.close()
            self.accumulator.close()
        written = []
        for path, time in zip(staged, scene["forecast_times"], strict=True):
            target = folder / f"{region}_{time}.tif"
            try:
                with atomic_path(target) as partial:
                    rasterio.shutil.copy(path, partial, driver="COG", **cog_options)
            except OSError as error:
                self.discard()
                raise OSError(error.errno, f"could not write the mosaic {target}: {error}") from error
            written.append(target)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return written

    def discard(self) -> None:
        """Drop the blend in progress (its work folder) after an error."""
        self.accumulator.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)


class MosaicWriter(BasePredictionWriter):
    """Write ``predict`` forecasts (``ForecastTask.predict_step``): whole-scene mosaics, one Cloud-Optimized
    GeoTIFF per region and forecast step, or one GeoTIFF per window for ``predict_mode: pairs`` batches.

    Args:
        output_dir: folder of the written files (default: the model's ``predict_dir``, else ``predictions/`` in
            the run folder).
        output: ``reflectance`` (float32 in [0, 1], nodata NaN) or ``digital_numbers`` (the input's data type,
            scale, offset and nodata; nodata 0, or NaN for float data, when the input has none).
        compress: COG compression (GDAL ``COMPRESS``, e.g. deflate, lzw, zstd).
        blocksize: COG tile size in pixels (a multiple of 16, >= 128); overviews are built down to one tile.
        keep_predictions: also return the forecasts from ``trainer.predict`` (Lightning then holds every window
            in memory until the end; off by default so memory stays bounded).
        cache_mb: GDAL block cache while blending and writing (``GDAL_CACHEMAX``; GDAL's default is 5% of the
            machine's memory), the writer's memory bound.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        output: str = "reflectance",
        compress: str = "deflate",
        blocksize: int = 512,
        keep_predictions: bool = False,
        cache_mb: int = 256,
    ):
        super().__init__(write_interval="batch")
        if output not in OUTPUTS:
            raise ValueError(f"MosaicWriter output={output!r} must be one of {OUTPUTS}")
        if blocksize < 128 or blocksize % 16:
            raise ValueError(
                f"MosaicWriter blocksize={blocksize} must be a multiple of 16 of at least 128 (GDAL COG)"
            )
        self.output_dir = output_dir
        self.output = output
        self.cog_options = {
            "compress": compress,
            "predictor": "YES",
            "blocksize": blocksize,
            "overview_resampling": "average",
            "bigtiff": "IF_SAFER",
        }
        self.keep_predictions = keep_predictions
        self.cache_bytes = cache_mb * 2**20
        self.folder: Path | None = None
        self.mosaics: dict[str, SceneMosaic] = {}
        self.written: list[Path] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        if trainer.world_size > 1:
            raise ValueError(
                f"MosaicWriter blends each scene in one process; predict on one device (got world size "
                f"{trainer.world_size}: set trainer.devices=1)"
            )
        if not self.keep_predictions:
            trainer.predict_loop.return_predictions = False
        predict_dir = getattr(pl_module, "predict_dir", None)
        self.folder = Path(self.output_dir or predict_dir or run_directory(trainer) / "predictions")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.folder):
                pass
        except OSError as error:
            key = "MosaicWriter output_dir" if self.output_dir else "model.init_args.predict_dir"
            raise OSError(
                error.errno, f"predictions folder {self.folder} is not writable ({key}): {error}"
            ) from None
        self.mosaics, self.written = {}, []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        forecasts = prediction["forecast"].detach().float().cpu().numpy()
        if "scene" not in prediction:
            self.write_windows(prediction, forecasts[:, 0])
            return
        masks = prediction["mask"].cpu().numpy()
        windows = prediction["window"].tolist()
        with rasterio.Env(GDAL_CACHEMAX=self.cache_bytes):
            for i, region in enumerate(prediction["region"]):
                mosaic = self.mosaics.get(region)
                if mosaic is None:
                    work_dir = Path(tempfile.mkdtemp(prefix=f".mosaic_{region}_", dir=self.folder))
                    scene = json.loads(prediction["scene"][i])
                    mosaic = self.mosaics[region] = SceneMosaic(scene, prediction["crs"][i], work_dir)
                row, col = windows[i]
                mosaic.add(row, col, forecasts[i], masks[i])
                if mosaic.complete:
                    self.finish(region)

    def finish(self, region: str) -> None:
        """Write a region's mosaics (one per forecast step) and forget its blend."""
        self.written += self.mosaics.pop(region).write(self.folder, region, self.output, self.cog_options)

    def write_windows(self, prediction: dict[str, Any], forecasts: np.ndarray) -> None:
        """One float32 GeoTIFF per window (``predict_mode: pairs``), named by region, target time and origin."""
        for i, forecast in enumerate(forecasts):
            transform = tuple(float(v) for v in prediction["transform"][i])
            origin = f"{transform[2]}_{transform[5]}"
            target = self.folder / f"{prediction['region'][i]}_{prediction['target_time'][i]}_{origin}.tif"
            profile = {"driver": "GTiff", "count": forecast.shape[0], "height": forecast.shape[1]}
            profile.update(width=forecast.shape[2], dtype="float32", crs=prediction["crs"][i])
            with (
                atomic_path(target) as partial,
                rasterio.open(partial, "w", transform=Affine(*transform[:6]), **profile) as dst,
            ):
                dst.write(forecast)
            self.written.append(target)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the scenes whose windows did not all arrive (``limit_predict_batches``), with a warning."""
        for region, mosaic in list(self.mosaics.items()):
            warnings.warn(
                f"MosaicWriter: region {region} got {mosaic.windows_added} of its {mosaic.scene['windows']} "
                "windows; its mosaic is written with the rest left nodata",
                stacklevel=2,
            )
            with rasterio.Env(GDAL_CACHEMAX=self.cache_bytes):
                self.finish(region)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        for mosaic in self.mosaics.values():
            mosaic.discard()
        self.mosaics = {}
