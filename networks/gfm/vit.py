"""ViT-family backbones read at evenly spaced blocks: SSL4EO-S12 MAE/DINO and ScaleMAE (timm ViT, torchgeo's
``ScaleMAE``), CROMA's optical encoder and DOFA (torchgeo), RemoteCLIP (open_clip's ``VisionTransformer``).

Each selected block's tokens (class token dropped) become a ``(B, C, h, w)`` map at the patch grid; the 4x up,
2x up, identity, 2x down of PANGAEA's ViT pyramid is the trainable neck (``networks.gfm.PyramidNeck``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchgeo.models import CROMA, DOFA, ScaleMAE

from networks.gfm.base import (
    BlockCapture,
    FrozenBackboneExtractor,
    load_state_dict_file,
    load_strict,
    tokens_to_map,
)

CROMA_OPTICAL_BANDS = 12


class _TokenBlocksExtractor(FrozenBackboneExtractor):
    """Hooks the backbone's ``blocks`` (a ModuleList of batch-first token blocks) at ``layers``."""

    patch_size: int

    def blocks(self) -> nn.ModuleList:
        return self.backbone.blocks

    def run(self, x: Tensor) -> None:
        self.backbone(x)

    def layer_channels(self) -> list[int]:
        return [self.backbone.embed_dim] * len(self.layers)

    def layer_maps(self, x: Tensor) -> list[Tensor]:
        with BlockCapture(self.blocks(), self.layers) as outputs:
            self.run(x)
        grid = self.image_size // self.patch_size
        return [tokens_to_map(outputs[i], grid) for i in self.layers]


class TimmViTExtractor(_TokenBlocksExtractor):
    """A timm ViT (SSL4EO-S12 MAE/DINO: torchgeo ``ViTSmall16_Weights.SENTINEL2_ALL_{MAE,DINO}``), or with
    ``scale_mae_res`` torchgeo's ``ScaleMAE`` (GSD positional embedding at that resolution, metres;
    ``ScaleMAELarge16_Weights.FMOW_RGB``). The files hold the encoder; a classifier ``head`` in them is unused.
    """

    def __init__(
        self,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        patch_size: int = 16,
        image_size: int = 224,
        layers: Sequence[int] = (3, 5, 7, 11),
        scale_mae_res: float | None = None,
        weights_path: str | None = None,
        seed: int = 0,
    ):
        common = dict(
            img_size=image_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            num_classes=0,
        )
        if scale_mae_res is None:
            build = partial(VisionTransformer, **common)
        else:
            norm = partial(nn.LayerNorm, eps=1e-6)
            build = partial(ScaleMAE, res=scale_mae_res, qkv_bias=True, norm_layer=norm, **common)
        self.patch_size = patch_size
        super().__init__(build, image_size, layers, mean, std, weights_path, seed)

    def load_weights(self, path: str) -> None:
        state = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith("head.")}
        # ScaleMAE computes its positional embedding from the GSD; the file's fixed copy is not used
        optional = ("norm.weight", "norm.bias", "pos_embed")
        load_strict(self.backbone, state, path, optional=optional)

    def run(self, x: Tensor) -> None:
        self.backbone.forward_features(x)


class DOFAExtractor(_TokenBlocksExtractor):
    """torchgeo's DOFA (``DOFABase16_Weights.DOFA_MAE``): its patch embedding is generated from the bands'
    ``wavelengths`` (micrometres, one per input band, in ``data.init_args.bands`` order), so it takes any bands."""

    def __init__(
        self,
        wavelengths: Sequence[float],
        mean: Sequence[float],
        std: Sequence[float],
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        patch_size: int = 16,
        image_size: int = 224,
        layers: Sequence[int] = (3, 5, 7, 11),
        weights_path: str | None = None,
        seed: int = 0,
    ):
        if len(wavelengths) != len(mean):
            raise ValueError(f"config key wavelengths needs one value per band (mean has {len(mean)})")
        build = partial(
            DOFA,
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            num_classes=0,
        )
        self.patch_size = patch_size
        self.wavelengths = [float(w) for w in wavelengths]
        super().__init__(build, image_size, layers, mean, std, weights_path, seed)

    def load_weights(self, path: str) -> None:
        # fc_norm and head belong to DOFA's classifier (torchgeo's loader allows them missing too)
        state = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith("head.")}
        load_strict(self.backbone, state, path, optional=("fc_norm.weight", "fc_norm.bias"))

    def run(self, x: Tensor) -> None:
        self.backbone.forward_features(x, self.wavelengths)


class RemoteCLIPExtractor(_TokenBlocksExtractor):
    """RemoteCLIP's image tower: open_clip's ``VisionTransformer`` (ViT-B-32 by default, as PANGAEA). The
    checkpoint is the whole CLIP model (``RemoteCLIP-ViT-B-32.pt``); its ``visual.`` entries are loaded."""

    def __init__(
        self,
        mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        patch_size: int = 32,
        output_dim: int = 512,
        image_size: int = 224,
        layers: Sequence[int] = (3, 5, 7, 11),
        weights_path: str | None = None,
        seed: int = 0,
    ):
        build = partial(
            OpenClipVisionTransformer,
            image_size=image_size,
            patch_size=patch_size,
            width=width,
            layers=depth,
            heads=num_heads,
            mlp_ratio=4.0,
            output_dim=output_dim,
        )
        self.patch_size = patch_size
        super().__init__(build, image_size, layers, mean, std, weights_path, seed)

    def blocks(self) -> nn.ModuleList:
        return self.backbone.transformer.resblocks

    def layer_channels(self) -> list[int]:
        return [self.backbone.transformer.width] * len(self.layers)

    def load_weights(self, path: str) -> None:
        state = load_state_dict_file(path)
        visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        load_strict(self.backbone, visual, path)


class CROMAExtractor(FrozenBackboneExtractor):
    """The optical encoder of torchgeo's CROMA (``CROMALarge_Weights.CROMA_VIT``; 12 Sentinel-2 bands, no B10;
    patch 8, 120 px). Its blocks add their residuals outside any module, so the blocks are run here one by one."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        encoder_dim: int = 1024,
        encoder_depth: int = 24,
        image_size: int = 120,
        layers: Sequence[int] = (3, 5, 7, 11),
        weights_path: str | None = None,
        seed: int = 0,
    ):
        if len(mean) != CROMA_OPTICAL_BANDS:
            raise ValueError(
                f"CROMA's optical encoder takes {CROMA_OPTICAL_BANDS} bands: config keys mean/std"
            )
        build = partial(
            CROMA,
            modalities=["optical"],
            encoder_dim=encoder_dim,
            encoder_depth=encoder_depth,
            image_size=image_size,
        )
        super().__init__(build, image_size, layers, mean, std, weights_path, seed)
        if max(self.layers) >= encoder_depth:
            raise ValueError(f"config key layers {self.layers} outside CROMA's {encoder_depth} blocks")

    def load_weights(self, path: str) -> None:
        state = load_state_dict_file(path)
        if "s2_encoder" not in state:
            raise ValueError(f"weight file {path} has no 's2_encoder' (CROMA's release layout)")
        load_strict(self.backbone.s2_encoder, state["s2_encoder"], path)

    def layer_channels(self) -> list[int]:
        return [self.backbone.encoder_dim] * len(self.layers)

    def layer_maps(self, x: Tensor) -> list[Tensor]:
        encoder = self.backbone.s2_encoder
        patch = encoder.patch_size
        grid = self.image_size // patch
        b, c = x.shape[:2]
        patches = (
            x.reshape(b, c, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, -1)
        )
        tokens = encoder.linear_input(patches)
        maps = {}
        for index, (attention, ffn) in enumerate(encoder.transformer.layers[: max(self.layers) + 1]):
            tokens = attention(tokens, self.backbone.attn_bias) + tokens
            tokens = ffn(tokens) + tokens
            if index in self.layers:
                maps[index] = tokens_to_map(tokens, grid)
        return [maps[i] for i in self.layers]
