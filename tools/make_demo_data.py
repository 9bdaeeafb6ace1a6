"""Convert the real FTW Austria Sentinel-2 pair into the forecasting layout under ``data/demo/``.

The source holds two acquisitions of one scene (bands 1-3 = R, G, B of window A, bands 5-7 = R, G, B of
window B, uint16 digital numbers). It is cut into a grid of tiles; each tile becomes a region folder with
``s2_rgb_<Region>_t0_10km.tif`` (A) and ``s2_rgb_<Region>_t1_10km.tif`` (B) on the tile's own grid.
The exact dates are not in the file, so the time keys are ``t0``/``t1``. No embeddings exist for it.

Usage: ``python tools/make_demo_data.py [SOURCE] [OUT_DIR]``
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared/data/ftw-austria-s2/inference-img.tif"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data/demo"
RGB_BANDS_BY_TIME = {"t0": (1, 2, 3), "t1": (5, 6, 7)}
RGB_PATTERN = "s2_rgb_{region}_{time}_10km.tif"


def tile_bounds(length: int, parts: int) -> list[tuple[int, int]]:
    """Split ``length`` pixels into ``parts`` contiguous (start, size) spans of near-equal size."""
    edges = np.linspace(0, length, parts + 1).round().astype(int)
    return [(int(a), int(b - a)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def convert(source: Path, out_dir: Path, rows: int = 2, cols: int = 3) -> list[Path]:
    """Write ``rows * cols`` region folders (named ``austria_r<row>c<col>``); return the files written."""
    written = []
    with rasterio.open(source) as src:
        if src.count < 7:
            raise ValueError(f"{source}: expected 8 bands (RGBN of two windows), found {src.count}")
        for row_index, (row, height) in enumerate(tile_bounds(src.height, rows)):
            for col_index, (col, width) in enumerate(tile_bounds(src.width, cols)):
                region = f"austria_r{row_index}c{col_index}"
                window = Window(col, row, width, height)
                profile = {
                    "driver": "GTiff",
                    "count": 3,
                    "height": height,
                    "width": width,
                    "dtype": "uint16",
                    "crs": src.crs,
                    "transform": window_transform(window, src.transform),
                    "compress": "deflate",
                    "predictor": 2,
                }
                for time, bands in RGB_BANDS_BY_TIME.items():
                    path = out_dir / region / RGB_PATTERN.format(region=region, time=time)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with rasterio.open(path, "w", **profile) as dst:
                        dst.write(src.read(bands, window=window))
                        dst.set_band_description(1, "red")
                        dst.set_band_description(2, "green")
                        dst.set_band_description(3, "blue")
                    written.append(path)
    return written


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE
    out_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_OUT
    for path in convert(source, out_dir):
        print(path)
