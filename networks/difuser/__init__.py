"""SatDiFuser networks: frozen diffusion feature extractor, feature cache, fusion modules and task heads."""

from networks.difuser.cache import FeatureCache
from networks.difuser.extractor import (
    DiffusionBackbone,
    DiffusionFeatureExtractor,
    PretrainedDiffusionBackbone,
    RandomDiffusionBackbone,
)
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
    "DiffusionBackbone",
    "DiffusionFeatureExtractor",
    "FeatureCache",
    "GlobalWeightedFusion",
    "LinearClassificationHead",
    "LocalizedWeightedFusion",
    "MoEFusion",
    "PretrainedDiffusionBackbone",
    "RandomDiffusionBackbone",
    "SingleFeature",
    "UPerNetHead",
]
