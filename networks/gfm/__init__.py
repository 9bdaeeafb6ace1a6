"""Geospatial foundation models as frozen pyramid extractors for SatDiFuser's comparison probes (issue 10)."""

from networks.gfm.base import FrozenBackboneExtractor
from networks.gfm.neck import PyramidNeck
from networks.gfm.swin import SwinExtractor
from networks.gfm.vit import CROMAExtractor, DOFAExtractor, RemoteCLIPExtractor, TimmViTExtractor

__all__ = [
    "CROMAExtractor",
    "DOFAExtractor",
    "FrozenBackboneExtractor",
    "PyramidNeck",
    "RemoteCLIPExtractor",
    "SwinExtractor",
    "TimmViTExtractor",
]
