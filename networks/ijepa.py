"""I-JEPA networks for Sat-JEPA-Diff: encoder, predictor, projection head, EMA target encoder, masking.

Tokens are always laid out row-major on the patch grid (index = row * grid_size + col), the order in which
timm's PatchEmbed flattens an image and in which ``build_sincos2d_pos_embed`` lists positions. Every module
and helper here keeps that order, so a token index always names the same 2-D grid cell.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Select ``indices`` (B, K) from ``tokens`` (B, N, D) per sample -> (B, K, D)."""
    return torch.gather(tokens, 1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def pool_patch_embedding(embedding: torch.Tensor, patch_size: int, normalize: bool = True) -> torch.Tensor:
    """Average-pool a per-pixel embedding (B, C, H, W) per patch into grid tokens (B, N, C).

    These are the I-JEPA regression targets (the AlphaEarth embedding of t+1). Each token is layer-normed over
    its channels (no affine) when ``normalize`` so the targets have a fixed scale whatever the source's.
    """
    _check_divisible(embedding.shape[-2:], patch_size, "embedding")
    tokens = F.avg_pool2d(embedding, patch_size).flatten(2).transpose(1, 2)
    return F.layer_norm(tokens, tokens.shape[-1:]) if normalize else tokens


def patch_token_validity(valid_pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Token validity (B, N) from a pixel validity mask (B, H, W): a token is valid only if all its pixels are.

    Use it as ``token_valid`` of :class:`metrics.losses.HybridIJEPALoss` so nodata pixels never reach a loss.
    """
    _check_divisible(valid_pixels.shape[-2:], patch_size, "valid-pixel mask")
    invalid = F.max_pool2d((~valid_pixels).float().unsqueeze(1), patch_size)
    return invalid.flatten(1) == 0


def _check_divisible(size: torch.Size, patch_size: int, what: str) -> None:
    if size[0] % patch_size or size[1] % patch_size:
        raise ValueError(f"{what} of size {tuple(size)} is not divisible by patch_size={patch_size}")


def _sincos_positions(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (1, grid_size**2, dim), row-major like the tokens."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    return build_sincos2d_pos_embed([grid_size, grid_size], dim=dim).unsqueeze(0)


class IJEPAEncoder(nn.Module):
    """Context encoder E_theta: a timm ViT without CLS token and with fixed 2-D sin-cos positions.

    ``forward(image, keep_indices=None)`` returns patch tokens (B, N, embed_dim); with ``keep_indices`` (B, K)
    only those tokens (the I-JEPA context) enter the transformer and (B, K, embed_dim) comes back.
    """

    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 8,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        self.vit = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_token=False,
            pos_embed="none",
            drop_path_rate=drop_path_rate,
        )
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        # Fixed positions are rebuilt from the config, so they stay out of checkpoints.
        self.register_buffer("pos_embed", _sincos_positions(self.grid_size, embed_dim), persistent=False)

    def forward(self, image: torch.Tensor, keep_indices: torch.Tensor | None = None) -> torch.Tensor:
        expected = (self.in_chans, self.img_size, self.img_size)
        if image.ndim != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(
                f"IJEPAEncoder expects images (B, {', '.join(map(str, expected))}), got {tuple(image.shape)}"
            )
        tokens = self.vit.patch_embed(image) + self.pos_embed
        if keep_indices is not None:
            tokens = gather_tokens(tokens, keep_indices)
        tokens = self.vit.norm_pre(tokens)
        if self.vit.grad_checkpointing and torch.is_grad_enabled():
            tokens = checkpoint_seq(self.vit.blocks, tokens)
        else:
            tokens = self.vit.blocks(tokens)
        return self.vit.norm(tokens)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (timm's switch) to save memory in training."""
        self.vit.set_grad_checkpointing(enable)


class IJEPAPredictor(nn.Module):
    """Predictor P_phi: narrow transformer that predicts tokens at target grid positions from context tokens.

    Context tokens are projected to ``width`` and given the sin-cos position of their grid cell; one learned mask
    token per target position, plus that position's sin-cos embedding, is appended. The transformer output at the
    mask tokens is projected to ``out_dim`` (the encoder width, so it is comparable with target-encoder features).
    ``target_indices=None`` predicts all grid positions in order (what the adapter consumes, in training and at
    inference); ``context_indices=None`` means the context is the full grid.
    """

    def __init__(
        self,
        grid_size: int = 16,
        in_dim: int = 768,
        width: int = 384,
        depth: int = 6,
        num_heads: int = 12,
        out_dim: int = 768,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.grid_size = grid_size
        self.num_patches = grid_size**2
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        trunc_normal_(self.mask_token, std=0.02)
        self.blocks = nn.Sequential(
            *(
                Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=rate)
                for rate in torch.linspace(0, drop_path_rate, depth).tolist()
            )
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)
        self.register_buffer("pos_embed", _sincos_positions(grid_size, width), persistent=False)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (as timm models do) to save memory in training."""
        self.grad_checkpointing = enable

    def _positions(self, indices: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        positions = self.pos_embed.expand(batch_size, -1, -1)
        return positions if indices is None else gather_tokens(positions, indices)

    def forward(
        self,
        context_tokens: torch.Tensor,
        context_indices: torch.Tensor | None = None,
        target_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch_size, num_context, _ = context_tokens.shape
        expected_context = self.num_patches if context_indices is None else context_indices.shape[1]
        if num_context != expected_context:
            raise ValueError(
                f"IJEPAPredictor got {num_context} context tokens but {expected_context} context positions"
            )
        context = self.embed(context_tokens) + self._positions(context_indices, batch_size)
        queries = self.mask_token + self._positions(target_indices, batch_size)
        tokens = torch.cat([context, queries], dim=1)
        if self.grad_checkpointing and torch.is_grad_enabled():
            tokens = checkpoint_seq(self.blocks, tokens)
        else:
            tokens = self.blocks(tokens)
        return self.head(self.norm(tokens[:, num_context:]))


class EmbeddingProjectionHead(nn.Module):
    """Projects predicted tokens (B, N, in_dim) onto the AlphaEarth embedding space (B, N, out_dim).

    The input is layer-normed first (no affine, as the reference does) so the linear map sees unit-scale
    features whatever the predictor's output scale.
    """

    def __init__(self, in_dim: int = 768, out_dim: int = 64):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(F.layer_norm(tokens, tokens.shape[-1:]))


class MomentumSchedule:
    """EMA momentum tau over training, from ``base`` at step 0 to ``final`` at ``total_steps``.

    ``linear`` is Appendix B.2's tau_t = base + t (final - base) / T; ``cosine`` (Appendix B.1's wording) is
    tau_t = final - (final - base) (1 + cos(pi t / T)) / 2. Steps past T stay at ``final``.
    """

    def __init__(
        self, base: float = 0.999, final: float = 1.0, schedule: Literal["linear", "cosine"] = "linear"
    ):
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"MomentumSchedule schedule must be 'linear' or 'cosine', got {schedule!r}")
        if not 0.0 <= base <= final <= 1.0:
            raise ValueError(
                f"MomentumSchedule needs 0 <= base <= final <= 1, got base={base}, final={final}"
            )
        self.base = base
        self.final = final
        self.schedule = schedule

    def __call__(self, step: int, total_steps: int) -> float:
        if total_steps <= 0:
            raise ValueError(f"MomentumSchedule needs total_steps > 0, got {total_steps}")
        progress = min(max(step, 0), total_steps) / total_steps
        if self.schedule == "cosine":
            progress = (1.0 - math.cos(math.pi * progress)) / 2.0
        return self.base + progress * (self.final - self.base)


class EMATargetEncoder(nn.Module):
    """Target encoder E_xi: a frozen copy of the online encoder, moved towards it by EMA after optimizer steps.

    Its parameters have ``requires_grad=False`` (keep them out of the optimizer) and it always runs in eval
    mode; they are trained state, so they belong in checkpoints. ``forward`` runs without gradients.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(encoder).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> EMATargetEncoder:
        """Stay in eval mode: the targets must not depend on dropout/drop-path draws."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.encoder(*args, **kwargs)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, parameter by parameter."""
        target_params = dict(self.encoder.named_parameters())
        online_params = dict(online.named_parameters())
        if target_params.keys() != online_params.keys():
            raise ValueError("EMATargetEncoder.update: online encoder's parameters do not match the target's")
        for name, target in target_params.items():
            target.lerp_(online_params[name].detach(), 1.0 - momentum)


class MultiBlockMaskGenerator:
    """I-JEPA multi-block masking on the patch grid (Appendix B.4), sampled per batch.

    ``__call__(batch_size, generator=None, sample_generators=None)`` returns ``(context_indices, target_indices)``,
    LongTensors of shapes (B, K_ctx) and (B, K_tgt) with sorted row-major grid indices. Block sizes are drawn once
    per batch from ``generator`` (so every sample has the same token count, as tensors must), block positions per
    sample from that sample's entry of ``sample_generators`` (default: ``generator`` too). Per-sample generators
    make a sample's mask independent of the batch it is in (so DDP ranks and one process draw the same masks).
    A block of scale s and aspect ratio r covers about s * grid_size**2 tokens with height/width about r (rounded
    to the grid, clipped to it). The union of ``num_context_blocks`` (``num_target_blocks``) blocks forms the context
    (target) set; if unions differ in size within the batch, each sample keeps a random subset of the smallest
    size. Context and target may overlap (the paper's setting): the target is the future frame, so seeing the
    same place at time t is the forecasting task, not a leak. ``min_keep`` is checked against the smallest
    block the scales allow as soon as the grid is known, so sampling never fails mid-epoch.

    ``grid_size=None`` takes the grid from the encoder it is used with (``ForecastModule`` calls
    :meth:`set_grid_size` with the encoder's grid), so the grid is configured once, on the encoder.
    """

    def __init__(
        self,
        grid_size: int | None = None,
        context_scale: tuple[float, float] = (0.7, 1.0),
        target_scale: tuple[float, float] = (0.2, 0.5),
        aspect_ratio: tuple[float, float] = (0.75, 1.5),
        context_aspect_ratio: tuple[float, float] = (1.0, 1.0),
        num_context_blocks: int = 1,
        num_target_blocks: int = 1,
        min_keep: int = 6,
    ):
        self.grid_size = self.num_patches = None
        self.context_scale = tuple(context_scale)
        self.target_scale = tuple(target_scale)
        self.aspect_ratio = tuple(aspect_ratio)
        self.context_aspect_ratio = tuple(context_aspect_ratio)
        self.num_context_blocks = num_context_blocks
        self.num_target_blocks = num_target_blocks
        self.min_keep = min_keep
        for key in ("context_scale", "target_scale", "aspect_ratio", "context_aspect_ratio"):
            low, high = getattr(self, key)
            if not 0 < low <= high or (key.endswith("scale") and high > 1):
                raise ValueError(f"MultiBlockMaskGenerator {key}={getattr(self, key)} is not a valid range")
        if num_context_blocks < 1 or num_target_blocks < 1:
            raise ValueError(
                "MultiBlockMaskGenerator needs num_context_blocks >= 1 and num_target_blocks >= 1"
            )
        if grid_size is not None:
            self.set_grid_size(grid_size)

    def set_grid_size(self, grid_size: int) -> None:
        """Use a ``grid_size`` x ``grid_size`` token grid, checking that every block keeps ``min_keep`` tokens."""
        self.grid_size = grid_size
        self.num_patches = grid_size**2
        for key in ("context_scale", "target_scale"):
            smallest = self.smallest_block_area(getattr(self, key)[0])
            if smallest < self.min_keep:
                raise ValueError(
                    f"MultiBlockMaskGenerator {key}={getattr(self, key)} allows blocks of {smallest} tokens on a "
                    f"{grid_size}x{grid_size} grid, fewer than min_keep={self.min_keep}"
                )

    def smallest_block_area(self, scale: float) -> int:
        """A lower bound on the tokens of a block of this scale: width rounding loses at most half a column
        per row (at most grid_size rows); a width clipped to the grid still leaves one full row."""
        return max(1, min(math.floor(scale * self.num_patches - self.grid_size / 2), self.grid_size))

    def block_shape(self, scale: float, aspect_ratio: float) -> tuple[int, int]:
        """(height, width) in grid cells of a block covering ``scale`` of the grid with height/width ~ ratio."""
        area = scale * self.num_patches
        height = min(max(round(math.sqrt(area * aspect_ratio)), 1), self.grid_size)
        width = min(max(round(area / height), 1), self.grid_size)
        return height, width

    def _draw_shape(
        self, scale: tuple[float, float], aspect: tuple[float, float], generator
    ) -> tuple[int, int]:
        draws = torch.rand(2, generator=generator).tolist()
        chosen_scale = scale[0] + draws[0] * (scale[1] - scale[0])
        return self.block_shape(chosen_scale, aspect[0] + draws[1] * (aspect[1] - aspect[0]))

    def _union_of_blocks(self, shape: tuple[int, int], num_blocks: int, generator) -> torch.Tensor:
        height, width = shape
        cells = torch.zeros(self.grid_size, self.grid_size, dtype=torch.bool)
        for _ in range(num_blocks):
            top = int(torch.randint(0, self.grid_size - height + 1, (1,), generator=generator))
            left = int(torch.randint(0, self.grid_size - width + 1, (1,), generator=generator))
            cells[top : top + height, left : left + width] = True
        return cells.flatten().nonzero().squeeze(1)

    def _stack_equal(self, index_sets: list[torch.Tensor], generators: Sequence) -> torch.Tensor:
        size = min(len(indices) for indices in index_sets)
        kept = [
            indices[torch.randperm(len(indices), generator=generator)[:size]]
            for indices, generator in zip(index_sets, generators, strict=True)
        ]
        return torch.stack([indices.sort().values for indices in kept])

    def __call__(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        sample_generators: Sequence[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grid_size is None:
            raise ValueError(
                "MultiBlockMaskGenerator has no grid_size: set it, or use it inside ForecastModule"
            )
        if sample_generators is None:
            sample_generators = [generator] * batch_size
        elif len(sample_generators) != batch_size:
            raise ValueError(
                f"MultiBlockMaskGenerator got {len(sample_generators)} sample generators for a batch of {batch_size}"
            )
        context_shape = self._draw_shape(self.context_scale, self.context_aspect_ratio, generator)
        target_shape = self._draw_shape(self.target_scale, self.aspect_ratio, generator)
        contexts, targets = [], []
        for sample_generator in sample_generators:
            targets.append(self._union_of_blocks(target_shape, self.num_target_blocks, sample_generator))
            contexts.append(self._union_of_blocks(context_shape, self.num_context_blocks, sample_generator))
        # Several blocks per set: unions differ in size, and the size kept (the smallest) depends on the batch.
        return self._stack_equal(contexts, sample_generators), self._stack_equal(targets, sample_generators)
