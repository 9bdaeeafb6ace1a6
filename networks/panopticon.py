"""Panopticon (Waldmann et al. 2025) as the Sat-JEPA-Diff context encoder: the "Panopticon encoder" row of Table 1.

:class:`PanopticonEncoder` has the interface ``ForecastModule`` uses from ``encoder`` (that of
``networks.ijepa.IJEPAEncoder``): ``img_size`` (the data window, linked from ``data.init_args.patch_size``),
``grid_size``, ``embed_dim``, ``forward(image, keep_indices=None)`` returning row-major patch tokens and
``set_grad_checkpointing``. The architecture is torchgeo's (``torchgeo.models.panopticon``: DINOv2 ViT from timm
with the spectral channel-attention patch embedding ``PanopticonPE``), built here with configurable widths so the
tests can build a tiny one; at the defaults its state dict is that of ``torchgeo.models.panopticon_vitb14``.

Grid: Panopticon's patches are 14 px and it was pretrained at 224 px (a 16 x 16 grid). The window is resized
(bilinear) to ``grid_size * 14`` px, so the token grid is ``grid_size`` whatever the window size, and token
(i, j) covers the window's cell (i, j) of ``img_size / grid_size`` px: the predictor, the adapter, the masks, the
token-validity mask and the pooled AlphaEarth targets (``img_size / grid_size`` px per token) all keep the grid
they have with the I-JEPA encoder. With ``grid_size: 16`` the resized image is exactly the pretraining size; other
grids get the position embedding interpolated (bicubic) from the checkpoint's, as torchgeo does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models import checkpoint_seq
from torch import nn
from torchgeo.models.panopticon import PanopticonPE

from networks.ijepa import gather_tokens

PANOPTICON_PATCH_SIZE = 14
SENTINEL2_RGB_WAVELENGTHS_NM = (664.6, 559.8, 492.4)
"""Central wavelengths of Sentinel-2A bands B04, B03, B02 (the data's R, G, B order), Panopticon's channel ids."""


class PanopticonEncoder(nn.Module):
    """Panopticon ViT as the I-JEPA context/target encoder (module docstring: the grid it keeps).

    Args:
        img_size: the data window in px (linked from ``data.init_args.patch_size``); divisible by ``grid_size``.
        grid_size: token grid per side; the window is resized to ``grid_size * 14`` px (16: the pretraining 224).
        wavelengths: one central wavelength (nm) per input channel, Panopticon's channel ids.
        mean, std: per-channel standardisation applied to the input (Panopticon's pretraining standardised each
            band by its dataset statistics); null leaves the reflectance as it is.
        embed_dim, depth, num_heads: the ViT (768, 12, 12: Panopticon ViT-B/14).
        attn_dim, attn_heads: width and heads of the spectral channel attention (2304, 16 in Panopticon).
        weights_path: local Panopticon checkpoint (``panopticon_vitb14_teacher.pth``, the state dict of torchgeo's
            ``Panopticon_Weights.VIT_BASE14``); null keeps random weights (tests, tiny configs).
        drop_path_rate: stochastic depth of the ViT blocks.
    """

    weights_key = "model.init_args.encoder.init_args.weights_path"

    def __init__(
        self,
        img_size: int = 128,
        grid_size: int = 16,
        wavelengths: Sequence[float] = SENTINEL2_RGB_WAVELENGTHS_NM,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        attn_dim: int = 2304,
        attn_heads: int = 16,
        weights_path: str | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if img_size % grid_size:
            raise ValueError(
                f"PanopticonEncoder img_size={img_size} is not divisible by grid_size={grid_size}"
            )
        for key, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) != len(wavelengths):
                raise ValueError(
                    f"PanopticonEncoder {key} has {len(values)} values for {len(wavelengths)} wavelengths"
                )
        self.img_size = img_size
        self.grid_size = grid_size
        self.num_patches = grid_size**2
        self.in_chans = len(wavelengths)
        self.embed_dim = embed_dim
        self.model_size = grid_size * PANOPTICON_PATCH_SIZE
        # torchgeo's Panopticon: timm's DINOv2 ViT-B/14 (layer scale, class token) with a spectral patch embedding.
        self.vit = timm.create_model(
            "vit_base_patch14_dinov2",
            pretrained=False,
            img_size=self.model_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            drop_path_rate=drop_path_rate,
            num_classes=0,
        )
        self.vit.patch_embed = PanopticonPE(
            attn_dim=attn_dim,
            embed_dim=embed_dim,
            patch_size=PANOPTICON_PATCH_SIZE,
            img_size=self.model_size,
            chnfus_cfg={"attn_cfg": {"num_heads": attn_heads}},
        )
        self.vit.pos_embed = nn.Parameter(torch.randn(1, 1 + self.num_patches, embed_dim) * 0.02)
        # The SAR channel embeddings never see an optical band: frozen, so no parameter goes without a gradient.
        self.vit.patch_embed.chnfus.chnemb.requires_grad_(False)
        self.register_buffer(
            "chn_ids", torch.tensor([list(wavelengths)], dtype=torch.float32), persistent=False
        )
        self.register_buffer("mean", _channel_buffer(mean, 0.0, self.in_chans), persistent=False)
        self.register_buffer("std", _channel_buffer(std, 1.0, self.in_chans), persistent=False)
        if weights_path is not None:
            self.load_weights(weights_path)

    def load_weights(self, weights_path: str) -> None:
        """Load a Panopticon checkpoint, its position embedding resampled to this grid (its mask token dropped)."""
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Panopticon weights not found at {path}: set config key '{self.weights_key}' to a local "
                "panopticon_vitb14_teacher.pth (or null for random weights)"
            )
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        state_dict.pop("mask_token", None)
        pos_embed = state_dict["pos_embed"]
        old_grid = round((pos_embed.shape[1] - 1) ** 0.5)
        state_dict["pos_embed"] = resample_abs_pos_embed(
            pos_embed, [self.grid_size] * 2, [old_grid] * 2, num_prefix_tokens=1
        )
        self.vit.load_state_dict(state_dict, strict=True)

    def patch_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """Standardised, resized window -> spectral patch embedding plus positions (B, grid_size**2, embed_dim)."""
        expected = (self.in_chans, self.img_size, self.img_size)
        if image.ndim != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(
                f"PanopticonEncoder expects images (B, {', '.join(map(str, expected))}), got {tuple(image.shape)}"
            )
        image = (image - self.mean) / self.std
        if self.model_size != self.img_size:
            image = F.interpolate(
                image, size=self.model_size, mode="bilinear", align_corners=False, antialias=True
            )
        chn_ids = self.chn_ids.expand(image.shape[0], -1).clone()  # PanopticonPE rewrites the ids in place
        return self.vit.patch_embed({"imgs": image, "chn_ids": chn_ids}) + self.vit.pos_embed[:, 1:]

    def forward(self, image: torch.Tensor, keep_indices: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.patch_tokens(image)
        if keep_indices is not None:
            tokens = gather_tokens(tokens, keep_indices)
        cls_token = (self.vit.cls_token + self.vit.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        tokens = self.vit.norm_pre(torch.cat([cls_token, tokens], dim=1))
        if self.vit.grad_checkpointing and torch.is_grad_enabled():
            tokens = checkpoint_seq(self.vit.blocks, tokens)
        else:
            tokens = self.vit.blocks(tokens)
        return self.vit.norm(tokens)[:, 1:]  # patch tokens only, row-major on the grid

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (timm's switch) to save memory in training."""
        self.vit.set_grad_checkpointing(enable)


def _channel_buffer(values: Sequence[float] | None, default: float, channels: int) -> torch.Tensor:
    filled = [default] * channels if values is None else list(values)
    return torch.tensor(filled, dtype=torch.float32).view(1, channels, 1, 1)
