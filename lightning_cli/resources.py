"""Where the shipped configs and demo data are: the source checkout, or the installed wheel.

The wheel carries ``configs/`` as ``lightning_cli/configs`` and ``data/`` as ``lightning_cli/data`` (package data,
see pyproject.toml); a checkout (also an editable install) has them at the repository root. ``configs`` stays a
plain folder, never an importable package, so no other ``configs`` package can shadow it.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_DIR = PACKAGE_DIR.parent


def resource_dir(name: str) -> Path:
    """The shipped folder ``name`` (``"configs"`` or ``"data"``): the wheel's copy, else the checkout's."""
    for folder in (PACKAGE_DIR / name, CHECKOUT_DIR / name):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"satdiff's {name}/ folder is neither in {PACKAGE_DIR} nor in {CHECKOUT_DIR}")


def config_dir() -> Path:
    """The shipped ``configs/`` folder."""
    return resource_dir("configs")


def demo_data_dir() -> Path:
    """The shipped demo data (``data/demo``)."""
    return resource_dir("data") / "demo"
