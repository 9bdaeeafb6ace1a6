"""The generic top-level names (also taken on PyPI) must resolve to this repository, and configs to its folder;
the built wheel must run outside the clone: its own packages, configs, demo data and the ``satdiff`` script."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lightning_cli import demo, resources

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("callbacks", "metrics", "networks", "datamodules", "lightning_modules", "lightning_cli")
SHIPPED = (*PACKAGES, "configs", "data", "pyproject.toml")


@pytest.mark.parametrize("name", PACKAGES)
def test_package_resolves_to_this_repository(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO_ROOT / name


def test_configs_are_read_from_this_repository():
    """``configs`` is a data folder, not a package: no installed ``configs`` package may shadow it, and the
    demo reads its configs by path from this repository."""
    spec = importlib.util.find_spec("configs")
    if spec is not None:
        assert spec.origin in (None, "namespace"), (
            f"an installed package named configs shadows the folder: {spec}"
        )
        assert REPO_ROOT / "configs" in {Path(p).resolve() for p in spec.submodule_search_locations}
    assert resources.config_dir() == REPO_ROOT / "configs"
    assert resources.demo_data_dir() == REPO_ROOT / "data" / "demo"
    assert demo.CONFIG_DIR == REPO_ROOT / "configs"
    for model in demo.DEMO_MODELS:
        assert (demo.CONFIG_DIR / model.config).is_file(), model.config


INSTALLED_CHECK = """
import sys
from pathlib import Path
import callbacks, datamodules, lightning_cli, lightning_modules, metrics, networks
from lightning_cli import resources
target = Path(sys.argv[1]).resolve()
for module in (callbacks, datamodules, lightning_cli, lightning_modules, metrics, networks):
    assert Path(module.__file__).resolve().is_relative_to(target), module.__file__
assert resources.config_dir() == target / "lightning_cli" / "configs", resources.config_dir()
assert (resources.config_dir() / "tiny" / "simvp.yaml").is_file()
assert sorted(resources.demo_data_dir().glob("*/s2_rgb_*_t0_10km.tif")), resources.demo_data_dir()
print("installed ok")
"""


@pytest.mark.slow
def test_built_wheel_runs_outside_the_clone(tmp_path):
    """Build the wheel from a copy of the sources, install it (no deps, offline) into a folder of its own and
    use it from elsewhere, with the venv's packages for the dependencies."""
    source = tmp_path / "source"
    for name in SHIPPED:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, source / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("satdiff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_cli/configs/tiny/simvp.yaml" in names
    assert any(name.startswith("lightning_cli/data/demo/") for name in names)
    assert not any(name.startswith(("configs/", "tests/", "data/")) for name in names)
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "satdiff = lightning_cli.cli:console_main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    target = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    run = dict(cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    checked = subprocess.run([sys.executable, "-c", INSTALLED_CHECK, str(target)], **run)
    assert checked.returncode == 0 and "installed ok" in checked.stdout, checked.stderr[-3000:]

    config = target / "lightning_cli" / "configs" / "tiny" / "persistence.yaml"
    script = subprocess.run(
        [str(target / "bin" / "satdiff"), "fit", "--config", str(config), "--print_config"], **run
    )
    assert script.returncode == 0 and "Persistence" in script.stdout, script.stderr[-3000:]
