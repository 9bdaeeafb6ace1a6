"""Run every benchmark script in ``bench/`` (each prints its own ratios) and fail if any of them fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def bench_scripts() -> list[Path]:
    """Every ``bench/*.py`` except this runner, in name order."""
    return sorted(path for path in BENCH_DIR.glob("*.py") if path.name != Path(__file__).name)


def main() -> int:
    failed = []
    for script in bench_scripts():
        print(f"== {script.relative_to(REPO_ROOT)}", flush=True)
        if subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT).returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"failed benchmarks: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
