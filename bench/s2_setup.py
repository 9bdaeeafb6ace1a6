"""Does a second S2 set-up skip the file reads? First vs second ``setup`` time on a dataset of the published shape.

Writes a scaled-down copy of the Sat-JEPA-Diff layout (regions x years of RGB and 64-band embeddings), then times
``setup("fit")`` of a fresh DataModule with an empty validation manifest (every file read) against fresh
DataModules that find the manifest (no pixel read). Prints both (median of repeats) and the ratio; goal < 5%.
``python bench/s2_setup.py --regions 100 --years 8 --size 1000`` is the full published shape (large on disk).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from datamodules.s2_timeseries import S2ForecastDataModule  # noqa: E402
from datamodules.synthetic.s2 import DN_SCALE, make_published_shape_dataset  # noqa: E402

GOAL = 0.05


def timed_setup(root: Path, cache: Path, patch_size: int, embedding_patch_size: int) -> float:
    datamodule = S2ForecastDataModule(
        str(root),
        reflectance_scale=DN_SCALE,
        patch_size=patch_size,
        batch_size=8,
        cache_dir=str(cache),
        embedding_patch_size=embedding_patch_size,
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datamodule.setup("fit")
    return time.perf_counter() - started


def run(
    regions: int, years: int, size: int, patch_size: int, repeats: int, embedding_patch_size: int
) -> float:
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the per-setup split report
    with tempfile.TemporaryDirectory() as folder:
        root, cache = Path(folder) / "data", Path(folder) / "cache"
        started = time.perf_counter()
        make_published_shape_dataset(root, regions=regions, years=years, size=size)
        print(
            f"dataset: {regions} regions x {years} years, {size} px, RGB + 64-band embeddings "
            f"(written in {time.perf_counter() - started:.1f} s)"
        )
        first = []
        for _ in range(repeats):
            for manifest in cache.glob("*.json"):
                manifest.unlink()
            first.append(timed_setup(root, cache, patch_size, embedding_patch_size))
        second = [timed_setup(root, cache, patch_size, embedding_patch_size) for _ in range(repeats)]
    first_s, second_s = statistics.median(first), statistics.median(second)
    ratio = second_s / first_s
    print(f"first setup  (every file read):  {first_s:8.3f} s")
    print(f"second setup (manifest, no read): {second_s:8.3f} s")
    verdict = "ok" if ratio < GOAL else f"SECOND SETUP TOO SLOW (goal < {GOAL:.0%})"
    print(f"second / first: {ratio:.1%}  {verdict}")
    return ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=10)
    parser.add_argument("--years", type=int, default=8)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--embedding-patch-size", type=int, default=8, help="as configs/forecast.yaml (first setups pool too)"
    )
    args = parser.parse_args()
    run(args.regions, args.years, args.size, args.patch_size, args.repeats, args.embedding_patch_size)
