"""Atomic writes: a file is written under a temporary name beside its target, fsynced and renamed over it.

A reader (another rank, a resumed run, QGIS) sees the old file or the new one, never half of one, and a killed
writer leaves only a hidden temporary (``.<name>.<random>.tmp``) that the next write of that name removes. The file
gets the permissions a plain ``open`` would give (``0o666`` minus the umask), not ``mkstemp``'s private ``0o600``, so
group members of a shared cluster folder can read it.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (the directory entry); not every filesystem allows opening a folder."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` for a library that writes by path (rasterio, safetensors, torch);
    on a clean exit it is fsynced and renamed to ``target``, on an error it is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    temporary = Path(name)
    try:
        os.fchmod(descriptor, 0o666 & ~_umask())
        os.close(descriptor)
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(target.parent)


@contextmanager
def atomic_open(target: str | os.PathLike[str], mode: str = "wb", **kwargs) -> Iterator[IO]:
    """``open(target, mode)`` that only replaces ``target`` once the ``with`` block has finished without error."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes whole files; mode must start with 'w', got {mode!r}")
    with atomic_path(target) as temporary, open(temporary, mode, **kwargs) as stream:
        yield stream
        stream.flush()
