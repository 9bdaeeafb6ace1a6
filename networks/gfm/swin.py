"""Swin backbones read at their 4 stages (strides 4, 8, 16, 32: already a pyramid): Satlas (torchvision's Swin-V2-B
as torchgeo's ``swin_v2_b`` builds it, ``Swin_V2_B_Weights.SENTINEL2_SI_MS_SATLAS``) and GFM (torchvision's Swin-B
with GFM's 6 px windows at 192 px; GFM's release is in Microsoft's Swin layout, converted on load)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn
from torchvision.models.swin_transformer import (
    PatchMerging,
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerBlockV2,
)

from networks.gfm.base import FrozenBackboneExtractor, load_state_dict_file, load_strict

CheckpointLayout = Literal["torchvision", "microsoft"]


def microsoft_to_torchvision(state: dict) -> dict:
    """Keys of Microsoft's Swin (``layers.i.blocks.j``, GFM/SimMIM's ``encoder.`` prefix) as torchvision's
    (``features.2i+1.j``); the SimMIM decoder, mask token and attention-mask buffers are dropped."""
    state = state.get("model", state)
    if any(key.startswith("encoder.") for key in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    renames = [
        (r"^patch_embed\.proj\.", "features.0.0."),
        (r"^patch_embed\.norm\.", "features.0.2."),
        (r"^layers\.(\d+)\.blocks\.(\d+)\.", lambda m: f"features.{2 * int(m[1]) + 1}.{m[2]}."),
        (r"^layers\.(\d+)\.downsample\.", lambda m: f"features.{2 * int(m[1]) + 2}."),
        (r"\.mlp\.fc1\.", ".mlp.0."),
        (r"\.mlp\.fc2\.", ".mlp.3."),
    ]
    converted = {}
    for key, value in state.items():
        if key == "mask_token" or key.endswith("attn_mask"):
            continue
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        converted[key] = value
    return converted


class SwinExtractor(FrozenBackboneExtractor):
    """torchvision's Swin Transformer (``version`` v1: Swin-B, v2: Swin-V2-B) with an ``in_chans`` patch embedding
    (torchgeo's Satlas replacement of the first conv); ``layers`` are stage indices 0-3.

    Args:
        checkpoint_layout: ``torchvision`` (torchgeo's Satlas files) or ``microsoft`` (GFM's release).
    """

    def __init__(
        self,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        version: Literal["v1", "v2"] = "v2",
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int = 8,
        image_size: int = 256,
        layers: Sequence[int] = (0, 1, 2, 3),
        checkpoint_layout: CheckpointLayout = "torchvision",
        weights_path: str | None = None,
        seed: int = 0,
    ):
        v2 = version == "v2"

        def build() -> SwinTransformer:
            backbone = SwinTransformer(
                patch_size=[4, 4],
                embed_dim=embed_dim,
                depths=list(depths),
                num_heads=list(num_heads),
                window_size=[window_size, window_size],
                block=SwinTransformerBlockV2 if v2 else SwinTransformerBlock,
                downsample_layer=PatchMergingV2 if v2 else PatchMerging,
            )
            backbone.features[0][0] = nn.Conv2d(in_chans, embed_dim, kernel_size=4, stride=4)
            backbone.head = nn.Identity()
            return backbone

        self.checkpoint_layout = checkpoint_layout
        super().__init__(build, image_size, layers, mean, std, weights_path, seed)
        if max(self.layers) > 3:
            raise ValueError(f"config key layers {self.layers}: Swin has stages 0-3")

    def load_weights(self, path: str) -> None:
        state = load_state_dict_file(path)
        if self.checkpoint_layout == "microsoft":
            state = microsoft_to_torchvision(state)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        load_strict(self.backbone, state, path, optional=("norm.weight", "norm.bias"))

    def layer_channels(self) -> list[int]:
        embed_dim = self.backbone.features[0][0].out_channels
        return [embed_dim * 2**stage for stage in self.layers]

    def layer_maps(self, x: Tensor) -> list[Tensor]:
        maps = []
        for index, module in enumerate(self.backbone.features[: 2 * max(self.layers) + 2]):
            x = module(x)
            if index % 2 == 1 and index // 2 in self.layers:
                maps.append(x.permute(0, 3, 1, 2))  # stages are channels-last
        return maps
