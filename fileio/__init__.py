"""File writing shared by every package: complete files only (checkpoints, manifests, caches, GeoTIFFs)."""

from fileio.atomic import atomic_open, atomic_path

__all__ = ["atomic_open", "atomic_path"]
