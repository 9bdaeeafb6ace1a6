"""The generic top-level names (also taken on PyPI) must resolve to this repository, and configs to its folder;
the built wheel must run outside the clone: its own packages, configs, demo data and the ``satdiff`` script."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from lightning_cli import demo, resources

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("callbacks", "metrics", "networks", "datamodules", "lightning_modules", "lightning_cli", "fileio")


def wheel_sources() -> list[str]:
    """What the wheel is built from: pyproject.toml, the top-level folder of every package it lists and the
    folders mapped into packages (configs/, data/)."""
    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools.get("package-dir", {})
    folders = {name.split(".")[0] for name in setuptools["packages"] if name not in mapped}
    return sorted(folders | set(mapped.values())) + ["pyproject.toml"]


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
import importlib, sys
from pathlib import Path
from lightning_cli import resources
target = Path(sys.argv[1]).resolve()
for name in sys.argv[2:]:
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().is_relative_to(target), module.__file__
assert resources.config_dir() == target / "lightning_cli" / "configs", resources.config_dir()
assert (resources.config_dir() / "tiny" / "simvp.yaml").is_file()
assert sorted(resources.demo_data_dir().glob("*/s2_rgb_*_t0_10km.tif")), resources.demo_data_dir()
assert resources.shipped_path("data/demo") == resources.demo_data_dir(), resources.shipped_path("data/demo")
print("installed ok")
"""


def temporary_venv(folder: Path) -> Path:
    """A fresh venv that sees this environment's installed packages as its dependencies, through a ``.pth`` line
    (which adds the folder but runs none of its ``.pth`` files, so the editable install stays invisible)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    (site_packages,) = (folder / "lib").glob("python3*/site-packages")
    (site_packages / "satdiff_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return folder / "bin" / "python"


@pytest.mark.slow
def test_built_wheel_runs_outside_the_clone(tmp_path):
    """Build the wheel from a copy of the sources, install it (no deps, offline) into a temporary venv and use it
    from another folder: its packages, configs, demo data, data generators and the ``satdiff`` script."""
    source = tmp_path / "source"
    for name in wheel_sources():
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, source / name)
    pip = ["-m", "pip", "-q", "--disable-pip-version-check"]
    built = subprocess.run([sys.executable, *pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True)  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("satdiff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_cli/configs/tiny/simvp.yaml" in names
    assert "datamodules/synthetic/geobench.py" in names
    assert any(name.startswith("lightning_cli/data/demo/") for name in names)
    assert not any(name.startswith(("configs/", "tests/", "data/")) for name in names)
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "satdiff = lightning_cli.cli:console_main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    python = temporary_venv(tmp_path / "venv")
    subprocess.run([str(python), *pip, "install", "--no-deps", "--no-index", str(wheel)], check=True)
    (target,) = (tmp_path / "venv" / "lib").glob("python3*/site-packages")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = dict(
        cwd=elsewhere, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    packages = [*(path.parent.name for path in source.glob("*/__init__.py")), "datamodules.synthetic"]
    checked = subprocess.run([str(python), "-c", INSTALLED_CHECK, str(target), *packages], **run)
    assert checked.returncode == 0 and "installed ok" in checked.stdout, checked.stderr[-3000:]

    generated = subprocess.run([str(python), "-m", "datamodules.synthetic.geobench", "geobench"], **run)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert (elsewhere / "geobench" / "classification_v1.0" / "m-eurosat" / "task_specs.pkl").is_file()

    satdiff = str(tmp_path / "venv" / "bin" / "satdiff")
    usage = subprocess.run([satdiff, "--help"], **run)
    assert usage.returncode == 0 and "fit" in usage.stdout, usage.stderr[-3000:]
    # the README's command, verbatim: the config and its `root: data/demo` are found in the installed package
    validated = subprocess.run([satdiff, "validate", "--config", "configs/tiny/persistence.yaml",
                                "--trainer.logger", "false", "--trainer.limit_val_batches", "1"], **run)  # fmt: skip
    assert validated.returncode == 0 and "val/loss" in validated.stdout, validated.stderr[-3000:]
