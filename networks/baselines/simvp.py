"""SimVP v2 with the gated spatio-temporal attention (gSTA) translator.

Written from Tan et al., "SimVP: Towards Simple yet Powerful Spatiotemporal Predictive Learning" (the v2 paper):
a per-frame convolutional encoder, a translator that treats the k stacked frame latents as channels and mixes
them with gSTA blocks (large-kernel attention split into depthwise, dilated depthwise and 1x1 convolutions, gated
by a sigmoid, followed by a depthwise-convolution MLP), and a per-frame decoder with a skip connection from the
first encoder layer. Here the translator emits one frame latent: the next frame.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn


class ConvNormAct(nn.Module):
    """3x3 convolution, GroupNorm(2) and SiLU; stride 2 downsamples, ``upsample`` doubles via PixelShuffle."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        conv_out = out_channels * 4 if upsample else out_channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, conv_out, 3, stride=stride, padding=1)]
        if upsample:
            layers.append(nn.PixelShuffle(2))
        layers += [nn.GroupNorm(2, out_channels), nn.SiLU()]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class GatedLargeKernelAttention(nn.Module):
    """gSTA's attention: depthwise k_d conv, dilated depthwise conv, 1x1 to (value, gate), value * sigmoid(gate)."""

    def __init__(self, dim: int, kernel_size: int, dilation: int = 3):
        super().__init__()
        local_kernel = 2 * dilation - 1
        dilated_kernel = kernel_size // dilation + ((kernel_size // dilation) % 2 - 1)
        self.local = nn.Conv2d(dim, dim, local_kernel, padding=local_kernel // 2, groups=dim)
        self.dilated = nn.Conv2d(
            dim,
            dim,
            dilated_kernel,
            padding=dilation * (dilated_kernel - 1) // 2,
            groups=dim,
            dilation=dilation,
        )
        self.to_value_and_gate = nn.Conv2d(dim, 2 * dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.to_value_and_gate(self.dilated(self.local(x))).chunk(2, dim=1)
        return torch.sigmoid(gate) * value


class SpatialAttention(nn.Module):
    """1x1 projection, GELU, gated large-kernel attention, 1x1 projection, with a shortcut."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.act = nn.GELU()
        self.attention = GatedLargeKernelAttention(dim, kernel_size)
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj_out(self.attention(self.act(self.proj_in(x))))


class ConvMlp(nn.Module):
    """1x1 expansion, depthwise 3x3, GELU, 1x1 reduction (the MixMlp of VAN/gSTA)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, hidden_dim, 1),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim),
            nn.GELU(),
            nn.Dropout(drop),
            nn.Conv2d(hidden_dim, dim, 1),
            nn.Dropout(drop),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GSTABlock(nn.Module):
    """One gSTA block: pre-norm attention and MLP residuals with layer scale, then an optional 1x1 reduction."""

    def __init__(
        self, in_dim: int, out_dim: int, kernel_size: int, mlp_ratio: float, drop: float, drop_path: float
    ):
        super().__init__()
        self.norm_attention = nn.BatchNorm2d(in_dim)
        self.attention = SpatialAttention(in_dim, kernel_size)
        self.norm_mlp = nn.BatchNorm2d(in_dim)
        self.mlp = ConvMlp(in_dim, int(in_dim * mlp_ratio), drop)
        self.scale_attention = nn.Parameter(1e-2 * torch.ones(in_dim, 1, 1))
        self.scale_mlp = nn.Parameter(1e-2 * torch.ones(in_dim, 1, 1))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.reduction = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.scale_attention * self.attention(self.norm_attention(x)))
        x = x + self.drop_path(self.scale_mlp * self.mlp(self.norm_mlp(x)))
        return self.reduction(x)


class SimVP(nn.Module):
    """SimVP v2 (gSTA): k frames ``(B, k, C, H, W)`` -> next frame ``(B, C, H, W)``.

    ``in_frames`` must equal the DataModule's ``history``; H and W must be divisible by
    ``2 ** (num_spatial_layers // 2)`` (every second encoder layer halves the resolution).
    """

    def __init__(
        self,
        in_frames: int = 1,
        channels: int = 3,
        hidden_spatial: int = 64,
        hidden_temporal: int = 512,
        num_spatial_layers: int = 4,
        num_temporal_blocks: int = 8,
        kernel_size: int = 21,
        mlp_ratio: float = 8.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if num_spatial_layers < 2 or num_temporal_blocks < 2:
            raise ValueError("SimVP needs num_spatial_layers >= 2 and num_temporal_blocks >= 2")
        self.in_frames = in_frames
        self.downsampling = 2 ** (num_spatial_layers // 2)
        strides = [2 if i % 2 else 1 for i in range(num_spatial_layers)]
        self.encoder = nn.ModuleList(
            ConvNormAct(channels if i == 0 else hidden_spatial, hidden_spatial, stride=s)
            for i, s in enumerate(strides)
        )
        self.decoder = nn.ModuleList(
            ConvNormAct(hidden_spatial, hidden_spatial, upsample=s == 2) for s in reversed(strides)
        )
        self.readout = nn.Conv2d(hidden_spatial, channels, 1)
        translator_in = in_frames * hidden_spatial
        drop_paths = torch.linspace(0.0, drop_path, num_temporal_blocks).tolist()
        dims = [translator_in] + [hidden_temporal] * (num_temporal_blocks - 1) + [hidden_spatial]
        self.translator = nn.Sequential(
            *(
                GSTABlock(dims[i], dims[i + 1], kernel_size, mlp_ratio, drop, drop_paths[i])
                for i in range(num_temporal_blocks)
            )
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        batch, frames, channels, height, width = image.shape
        if frames != self.in_frames:
            raise ValueError(
                f"SimVP was built for in_frames={self.in_frames} but got {frames} history frames"
            )
        if height % self.downsampling or width % self.downsampling:
            raise ValueError(f"SimVP needs H and W divisible by {self.downsampling}, got {height}x{width}")
        x = image.reshape(batch * frames, channels, height, width)
        x = self.encoder[0](x)
        skip = x.reshape(batch, frames, *x.shape[1:])[:, -1]
        for layer in self.encoder[1:]:
            x = layer(x)
        latent = self.translator(x.reshape(batch, frames * x.shape[1], *x.shape[2:]))
        for layer in self.decoder[:-1]:
            latent = layer(latent)
        return self.readout(self.decoder[-1](latent + skip))
