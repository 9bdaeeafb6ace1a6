"""The trainable neck between a frozen foundation model and the task head, in place of SatDiFuser's fusion.

A one-timestep pyramid needs no fusion, only what PANGAEA's UPerNet puts in front of its decoder: for a ViT
(4 maps at the patch grid) a learned 4x up (two 2x transposed convs with BatchNorm + GELU between), a 2x up (one
transposed conv), identity and a 2x max-pool (``scales: [4, 2, 1, 0.5]``); for Swin (already strides 4-32)
nothing (``scales: null``). Levels of different widths (Swin stages) are then projected by a 1x1 conv to
``out_channels``, since the heads take one width; UPerNet's own lateral 1x1 convs follow that projection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


def _resampler(channels: int, scale: float) -> nn.Module:
    if scale == 1:
        return nn.Identity()
    if scale < 1:
        return nn.MaxPool2d(kernel_size=round(1 / scale))
    ups: list[nn.Module] = []
    for step in range(round(scale).bit_length() - 1):
        if step:
            ups += [nn.BatchNorm2d(channels), nn.GELU()]
        ups.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
    return nn.Sequential(*ups)


class PyramidNeck(nn.Module):
    """``PyramidNeck(feature_channels, num_timesteps)`` as ``DiFuserModule`` builds its fusion.

    Args:
        scales: resampling factor per level (powers of two; None: none), e.g. ``[4, 2, 1, 0.5]`` for a ViT.
        out_channels: common width when the levels' widths differ; None (or equal widths) keeps the width.
    """

    aux_loss = 0.0

    def __init__(
        self,
        feature_channels: list[list[int]],
        num_timesteps: int,
        scales: Sequence[float] | None = None,
        out_channels: int | None = None,
    ):
        super().__init__()
        if num_timesteps != 1 or any(len(level) != 1 for level in feature_channels):
            raise ValueError("PyramidNeck takes one map per level (a frozen backbone's one-timestep pyramid)")
        widths = [level[0] for level in feature_channels]
        if scales is not None and len(scales) != len(widths):
            raise ValueError(f"config key scales needs {len(widths)} values, got {list(scales)}")
        for scale in scales or ():
            if scale <= 0 or not math.log2(scale).is_integer():
                raise ValueError(f"config key scales: {scale} is not a power of two")
        self.resample = nn.ModuleList(
            _resampler(width, scale) for width, scale in zip(widths, scales or [1] * len(widths), strict=True)
        )
        uniform = len(set(widths)) == 1 and out_channels in (None, widths[0])
        if not uniform and out_channels is None:
            raise ValueError(f"levels have widths {widths}: set config key fusion.init_args.out_channels")
        self.project = nn.ModuleList(
            nn.Identity() if uniform else nn.Conv2d(width, out_channels, kernel_size=1) for width in widths
        )
        self.out_channels = widths[0] if uniform else out_channels

    def forward(self, pyramid: list[list[Tensor]]) -> list[Tensor]:
        return [
            project(resample(maps[0]))
            for maps, resample, project in zip(pyramid, self.resample, self.project, strict=True)
        ]
