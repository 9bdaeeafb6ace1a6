"""SatDiFuser networks: frozen diffusion feature extractor, fusion modules and task heads."""

from networks.difuser.fusion import (
    ConcatFusion,
    GlobalWeightedFusion,
    LocalizedWeightedFusion,
    MoEFusion,
    SingleFeature,
)
from networks.difuser.heads import LinearClassificationHead, UPerNetHead

__all__ = [
    "ConcatFusion",
    "GlobalWeightedFusion",
    "LinearClassificationHead",
    "LocalizedWeightedFusion",
    "MoEFusion",
    "SingleFeature",
    "UPerNetHead",
]
