"""Write the SatDiFuser demo data: the six real BigEarthNet patches in GEO-Bench's m-bigearthnet format.

Source: ``../shared/data/bigearthnet-s2-examples`` (kai-tub/bigearthnet_common's example archive; code Apache-2.0,
BigEarthNet data CDLA-Permissive-1.0). Output: ``data/geobench_demo/classification_v1.0/m-bigearthnet/`` (12 bands at
native 120/60/20 px, real 43-class multi-labels, band_stats.json over the train split as geobench computes it,
partitions 4/1/1) plus the source and licence note. ``make demo`` trains and tests the tiny SatDiFuser on it.

    python -m tools.make_geobench_demo [--source DIR] [--out data/geobench_demo]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from datamodules.synthetic.geobench import write_bigearthnet

REPO_ROOT = Path(__file__).resolve().parents[1]
BIGEARTHNET_SOURCE = REPO_ROOT.parent / "shared" / "data" / "bigearthnet-s2-examples"
NOTE = """# SatDiFuser demo data (GEO-Bench m-bigearthnet format)

Six real BigEarthNet v1 Sentinel-2 L2A patches (120 x 120 px at 10 m; acquired 2017-06 to 2018-02), written into
GEO-Bench's on-disk format (`classification_v1.0/m-bigearthnet/`: one HDF5 per patch, task_specs.pkl,
band_stats.json, partitions) by `tools/make_geobench_demo.py`.

- Source: kai-tub/bigearthnet_common, `src/bigearthnet_common/BigEarthNet-S2-Example.tar.bz2`.
- Licence: BigEarthNet data CDLA-Permissive-1.0 (https://cdla.dev/permissive-1-0/); bigearthnet_common code
  Apache-2.0. Contains modified Copernicus Sentinel-2 data (2017-2018).
- BigEarthNet: Sumbul et al., "BigEarthNet: A Large-Scale Benchmark Archive for Remote Sensing Image
  Understanding", IGARSS 2019.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=BIGEARTHNET_SOURCE)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "geobench_demo")
    args = parser.parse_args()
    if not args.source.is_dir():
        raise SystemExit(f"BigEarthNet example patches not found at {args.source} (--source)")
    shutil.rmtree(args.out / "classification_v1.0" / "m-bigearthnet", ignore_errors=True)
    task_dir = write_bigearthnet(args.out, args.source)
    (args.out / "README.md").write_text(NOTE)
    print(f"wrote {task_dir}")


if __name__ == "__main__":
    main()
