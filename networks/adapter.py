"""Sat-JEPA-Diff conditioning adapter (Appendix B.1): I-JEPA tokens + coarse x_t -> SD3 conditioning."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn


class AdapterOutput(NamedTuple):
    """``tokens`` (B, M, joint_dim) and ``pooled`` (B, pooled_dim) condition SD3; ``gate`` (B, M) holds the
    learned weight alpha in (0, 1) of the semantic tokens (log its mean), None for a coarse-only adapter."""

    tokens: torch.Tensor
    pooled: torch.Tensor
    gate: torch.Tensor | None


def _token_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Three-layer token MLP with LayerNorm/GELU; the final LayerNorm keeps the output at a fixed scale."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, out_dim),
        nn.LayerNorm(out_dim),
    )


class ConditioningAdapter(nn.Module):
    """Fuses predicted I-JEPA tokens of t+1 with a coarse copy of x_t into SD3 cross-attention tokens.

    Semantic path: LayerNorm, learned position per grid cell, token MLP (semantic_dim -> hidden -> hidden ->
    joint_dim), then 2-D average pooling of the ``semantic_grid``^2 grid down to the coarse token grid, so a
    semantic token and a coarse token with the same index cover the same image area. Coarse path: x_t is
    area-resized to ``coarse_size``^2, cut into ``coarse_patch``^2 patches (M tokens of channels*patch^2
    values), given learned positions and passed through the same kind of MLP. Pooled: the mean normed semantic
    token through a two-layer MLP (semantic_dim -> pooled_hidden -> pooled_dim).

    Gate: h = alpha * h_semantic + (1 - alpha) * h_coarse with one alpha per token, alpha =
    sigmoid(Linear(2 * joint_dim -> 1)) of both tokens (bias 0: alpha starts near 0.5). Per token and content
    dependent, it can trust semantics where the coarse view says little, at 2 * joint_dim + 1 parameters; the
    reference's per-channel Linear(2 * joint_dim -> joint_dim) would add 33.6M parameters at full size, more
    than the paper's whole ~25M adapter, and the paper describes alpha as one balance value (~0.5).

    Reference dropout: in training each sample's coarse reference is dropped with probability
    ``reference_dropout``; that sample's tokens are then h_semantic alone (alpha forced to 1), never a zero
    image.

    Coarse-only ablation (``use_ijepa=False``): build with ``semantic_dim=None`` and ``reference_dropout=0``;
    forward then takes ``semantic_tokens=None``, tokens are h_coarse and pooled comes from the mean coarse
    patch through the pooled MLP.
    """

    def __init__(
        self,
        semantic_dim: int | None = 768,
        semantic_grid: int = 16,
        coarse_size: int = 32,
        coarse_patch: int = 4,
        image_channels: int = 3,
        hidden_dim: int = 1024,
        joint_dim: int = 4096,
        pooled_hidden_dim: int = 1024,
        pooled_dim: int = 2048,
        reference_dropout: float = 0.15,
    ):
        super().__init__()
        if coarse_size % coarse_patch:
            raise ValueError(
                f"ConditioningAdapter coarse_size={coarse_size} not divisible by coarse_patch={coarse_patch}"
            )
        self.coarse_grid = coarse_size // coarse_patch
        if semantic_dim is not None and semantic_grid % self.coarse_grid:
            raise ValueError(
                f"ConditioningAdapter semantic_grid={semantic_grid} is not a multiple of the coarse token grid "
                f"{self.coarse_grid} (coarse_size / coarse_patch), so the grids cannot be aligned by pooling"
            )
        if not 0.0 <= reference_dropout < 1.0:
            raise ValueError(
                f"ConditioningAdapter reference_dropout must be in [0, 1), got {reference_dropout}"
            )
        if semantic_dim is None and reference_dropout > 0:
            raise ValueError(
                "ConditioningAdapter with semantic_dim=None (coarse-only) has nothing to fall back on when the "
                f"coarse reference is dropped: set reference_dropout=0 (got {reference_dropout})"
            )
        self.semantic_dim = semantic_dim
        self.semantic_grid = semantic_grid
        self.coarse_size = coarse_size
        self.coarse_patch = coarse_patch
        self.image_channels = image_channels
        self.joint_dim = joint_dim
        self.pooled_dim = pooled_dim
        self.reference_dropout = reference_dropout
        self.num_tokens = self.coarse_grid**2

        patch_dim = image_channels * coarse_patch**2
        self.coarse_pos = nn.Parameter(trunc_normal_(torch.zeros(1, self.num_tokens, patch_dim), std=0.02))
        self.coarse_mlp = _token_mlp(patch_dim, hidden_dim, joint_dim)
        pooled_in = patch_dim if semantic_dim is None else semantic_dim
        self.pooled_mlp = nn.Sequential(
            nn.Linear(pooled_in, pooled_hidden_dim), nn.GELU(), nn.Linear(pooled_hidden_dim, pooled_dim)
        )
        if semantic_dim is not None:
            self.semantic_norm = nn.LayerNorm(semantic_dim)
            self.semantic_pos = nn.Parameter(
                trunc_normal_(torch.zeros(1, semantic_grid**2, semantic_dim), std=0.02)
            )
            self.semantic_mlp = _token_mlp(semantic_dim, hidden_dim, joint_dim)
            self.gate = nn.Linear(2 * joint_dim, 1)
            nn.init.zeros_(self.gate.bias)

    def coarse_patches(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, M, C * coarse_patch^2): area-resized to coarse_size, patches in row-major order."""
        if image.ndim != 4 or image.shape[1] != self.image_channels:
            raise ValueError(
                f"ConditioningAdapter expects images (B, {self.image_channels}, H, W), got {tuple(image.shape)}"
            )
        coarse = F.interpolate(image, size=(self.coarse_size, self.coarse_size), mode="area")
        return F.pixel_unshuffle(coarse, self.coarse_patch).flatten(2).transpose(1, 2)

    def semantic_tokens_on_coarse_grid(self, normed_tokens: torch.Tensor) -> torch.Tensor:
        """Project normed semantic tokens (B, grid^2, D), average-pool the 2-D grid to the coarse one (B, M, joint)."""
        batch_size = normed_tokens.shape[0]
        hidden = self.semantic_mlp(normed_tokens + self.semantic_pos)
        grid = hidden.transpose(1, 2).reshape(
            batch_size, self.joint_dim, self.semantic_grid, self.semantic_grid
        )
        pooled = F.avg_pool2d(grid, self.semantic_grid // self.coarse_grid)
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, semantic_tokens: torch.Tensor | None, image: torch.Tensor) -> AdapterOutput:
        patches = self.coarse_patches(image)
        coarse_hidden = self.coarse_mlp(patches + self.coarse_pos)
        if self.semantic_dim is None:
            if semantic_tokens is not None:
                raise ValueError(
                    "ConditioningAdapter was built coarse-only (semantic_dim=None) but got semantic tokens"
                )
            return AdapterOutput(coarse_hidden, self.pooled_mlp(patches.mean(1)), None)

        expected = (image.shape[0], self.semantic_grid**2, self.semantic_dim)
        if semantic_tokens is None:
            raise ValueError(
                f"ConditioningAdapter got no semantic tokens but was built with semantic_dim={self.semantic_dim}; "
                "for the coarse-only ablation set semantic_dim: null and reference_dropout: 0 in its config"
            )
        if tuple(semantic_tokens.shape) != expected:
            raise ValueError(
                f"ConditioningAdapter expects semantic tokens {expected}, got {tuple(semantic_tokens.shape)}"
            )
        normed_tokens = self.semantic_norm(semantic_tokens)
        semantic_hidden = self.semantic_tokens_on_coarse_grid(normed_tokens)
        gate = torch.sigmoid(self.gate(torch.cat([semantic_hidden, coarse_hidden], dim=-1)))
        mix = gate
        if self.training and self.reference_dropout > 0:
            dropped = torch.rand(image.shape[0], 1, 1, device=image.device) < self.reference_dropout
            mix = gate.masked_fill(dropped, 1.0)
        tokens = mix * semantic_hidden + (1 - mix) * coarse_hidden
        return AdapterOutput(tokens, self.pooled_mlp(normed_tokens.mean(1)), gate.squeeze(-1))
