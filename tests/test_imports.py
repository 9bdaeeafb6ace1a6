"""The generic top-level names (also taken on PyPI) must resolve to this repository, and configs to its folder."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

from lightning_cli import demo

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("callbacks", "metrics", "networks", "datamodules", "lightning_modules", "lightning_cli")


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
    assert demo.CONFIG_DIR == REPO_ROOT / "configs"
    for model in demo.DEMO_MODELS:
        assert (demo.CONFIG_DIR / model.config).is_file(), model.config
