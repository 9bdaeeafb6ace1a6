"""Task heads on the fused pyramid: a linear classifier and UPerNet (paper Section 4.1).

Each is built as ``Head(in_channels, num_classes, **config)`` and called as ``head(fused, output_size)`` where
``fused`` is the list of 4 fused maps (finest first) and ``output_size`` the input image's (H, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base.modules import Conv2dReLU
from segmentation_models_pytorch.decoders.upernet.decoder import PSPModule
from torch import Tensor, nn


class LinearClassificationHead(nn.Module):
    """Resize every level to the finest one, sum, global-average-pool, then one linear layer (linear probing)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, fused: list[Tensor], output_size: Sequence[int] | None = None) -> Tensor:
        size = fused[0].shape[-2:]
        summed = sum(F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in fused)
        return self.classifier(summed.mean(dim=(-2, -1)))


class UPerNetHead(nn.Module):
    """UPerNet decoder: pyramid pooling on the coarsest map, FPN top-down path, fusion at the finest scale.

    Follows the UPerNet head that GEO-Bench evaluations use (PPM scales 1,2,3,6; 512 FPN channels; Dropout2d 0.1;
    BatchNorm, which Lightning turns into SyncBatchNorm with ``sync_batchnorm``); logits are upsampled bilinearly
    to ``output_size``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        num_levels: int = 4,
    ):
        super().__init__()
        self.ppm = PSPModule(in_channels, channels, sizes=tuple(pool_scales), use_norm="batchnorm")
        self.lateral = nn.ModuleList(
            Conv2dReLU(in_channels, channels, kernel_size=1, use_norm="batchnorm")
            for _ in range(num_levels - 1)
        )
        self.fpn_out = nn.ModuleList(
            Conv2dReLU(channels, channels, kernel_size=3, padding=1, use_norm="batchnorm")
            for _ in range(num_levels - 1)
        )
        self.fuse = Conv2dReLU(
            num_levels * channels, channels, kernel_size=3, padding=1, use_norm="batchnorm"
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, fused: list[Tensor], output_size: Sequence[int]) -> Tensor:
        top = self.ppm(fused[-1])
        outputs = [top]
        for level in range(len(fused) - 2, -1, -1):
            lateral = self.lateral[level](fused[level])
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outputs.insert(0, self.fpn_out[level](top))
        size = outputs[0].shape[-2:]
        stacked = torch.cat(
            [outputs[0]]
            + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outputs[1:]],
            dim=1,
        )
        logits = self.classifier(self.dropout(self.fuse(stacked)))
        return F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)
