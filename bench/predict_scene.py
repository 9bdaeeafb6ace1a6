"""Is whole-scene prediction memory-bounded? Peak RSS of ``predict`` (the CLI, as a user runs it) per scene size.

Writes one region of ``history`` yearly S2 frames per size (uint16 digital numbers, a smooth field with noise),
runs ``python -m lightning_cli predict --config CONFIG`` on it in a child process (the default writer:
``callbacks.MosaicWriter``, one COG per region and step) and prints that process's peak RSS, the windows and the
wall time per size. Goal: under 2 GiB for a 4096 x 4096 scene with the tiny model; the peak should not grow with
the scene (it is bounded by the window batch and GDAL's block cache).
``python bench/predict_scene.py --sizes 1024 4096 --config configs/tiny/persistence.yaml`` (every window) and
``python bench/predict_scene.py --sizes 4096 --max-batches 8`` (the tiny Sat-JEPA-Diff, ~0.7 s a window on 2 CPU
cores: 8 batches, then the whole 4096 x 4096 mosaic blended and written).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from datamodules.scenes import scene_offsets  # noqa: E402
from datamodules.synthetic.s2 import region_transform, rgb_path, write_raster  # noqa: E402

GOAL_BYTES = 2 * 2**30
YEARS = (2019, 2020)


def write_scene(root: Path, size: int) -> None:
    """One region ``scene`` of ``size`` x ``size`` px per year: a diagonal gradient with noise, as real tiles
    compress (written in row blocks, so the parent never holds a whole scene in float)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(400, 2600, size, dtype=np.float32)
    for year in YEARS:
        data = np.empty((3, size, size), dtype=np.uint16)
        for start in range(0, size, 512):
            rows = slice(start, min(start + 512, size))
            field = (ramp[rows, None] + ramp[None, ::-1]) / 2
            data[:, rows] = field + rng.integers(0, 200, size=(3, *field.shape), dtype=np.uint16)
        write_raster(rgb_path(root, "scene", year), data, region_transform(0))


def peak_rss_of_predict(
    root: Path, run: Path, config: str, patch_size: int, batch_size: int, max_batches: int | None
) -> tuple[int, float]:
    """Peak RSS (bytes) and wall time of one CLI ``predict`` in a fresh child process."""
    command = [sys.executable, "-m", "lightning_cli", "predict", "--config", config]
    command += ["--data.init_args.root", str(root), "--data.init_args.time_regex", r"\d{4}"]
    command += [
        "--data.init_args.patch_size",
        str(patch_size),
        "--data.init_args.batch_size",
        str(batch_size),
    ]
    command += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    command += ["--trainer.default_root_dir", str(run)]
    if max_batches is not None:
        command += ["--trainer.limit_predict_batches", str(max_batches)]
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "WANDB_MODE": "offline"})
    _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"predict failed ({os.waitstatus_to_exitcode(status)}): {' '.join(command)}")
    return usage.ru_maxrss * 1024, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="scene sizes in pixels")
    parser.add_argument("--config", default="configs/tiny/forecast.yaml")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--max-batches",
        type=int,
        help="forecast only this many batches (a slow model on CPU); the mosaic is still blended and written "
        "over the whole scene, its other windows left nodata",
    )
    args = parser.parse_args()
    print(
        f"predict --config {args.config}, patch {args.patch_size}, batch {args.batch_size}, overlap patch/4, "
        f"batches {args.max_batches or 'all'}"
    )
    with tempfile.TemporaryDirectory(prefix="predict_scene_") as folder:
        for size in args.sizes:
            root, run = Path(folder) / f"data_{size}", Path(folder) / f"run_{size}"
            write_scene(root, size)
            peak, elapsed = peak_rss_of_predict(
                root, run, args.config, args.patch_size, args.batch_size, args.max_batches
            )
            windows = len(scene_offsets(size, args.patch_size, args.patch_size // 4)) ** 2
            mosaics = sorted(run.glob("predictions/*.tif"))
            with rasterio.open(mosaics[0]) as src:
                shape = f"{src.width}x{src.height}, {len(src.overviews(1))} overviews"
            goal = f" (goal < 2 GiB: {'met' if peak < GOAL_BYTES else 'NOT met'})" if size == 4096 else ""
            print(
                f"{size:>5} px: peak RSS {peak / 2**30:.2f} GiB, {windows} windows, {elapsed:.0f} s, "
                f"{mosaics[0].name} {shape}{goal}"
            )


if __name__ == "__main__":
    main()
