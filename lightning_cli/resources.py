"""Where the shipped configs and demo data are: the source checkout, or the installed wheel.

The wheel carries ``configs/`` as ``lightning_cli/configs`` and ``data/`` as ``lightning_cli/data`` (package data,
see pyproject.toml); a checkout (also an editable install) has them at the repository root. ``configs`` stays a
plain folder, never an importable package, so no other ``configs`` package can shadow it.

Shipped configs name shipped files by repository-relative paths (``root: data/demo``, ``tokenizer_path:
configs/tiny/sd3/tokenizer``). :func:`shipped_path` gives such a path's shipped copy when it does not exist from
the current directory, so the same config runs from the repository root, from any other folder and from the wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_DIR = PACKAGE_DIR.parent
SHIPPED_FOLDERS = ("configs", "data")


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


def shipped_path(path: str | os.PathLike) -> Path | None:
    """The shipped copy of ``path`` when it is relative, starts with ``configs/`` or ``data/``, does not exist
    from the current directory and does exist among the shipped files; else None (the path is used as given)."""
    path = Path(path)
    if path.is_absolute() or len(path.parts) < 2 or path.parts[0] not in SHIPPED_FOLDERS or path.exists():
        return None
    candidate = resource_dir(path.parts[0]).joinpath(*path.parts[1:])
    return candidate if candidate.exists() else None
