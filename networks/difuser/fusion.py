"""SatDiFuser fusion of multi-timestep, multi-block diffusion features (paper Sections 3.2-3.4, Table 3).

Every fusion maps a 4-level pyramid (``pyramid[level][j]``, entries timestep-major: ``j // blocks_in_level`` is the
timestep, ``j % blocks_in_level`` the block; see docs/DESIGN.md) to 4 maps of ``out_channels``. Each is built as
``Fusion(feature_channels, num_timesteps, **config)`` so the extractor supplies the channel layout and the config
only the fusion's own hyperparameters. After each forward, ``aux_loss`` holds a scalar in the autograd graph that
the training loss must add (MoE load balancing; zero for the others).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FeatureChannels = list[list[int]]


def _group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 32 that divides ``channels`` (tiny test models included)."""
    return nn.GroupNorm(math.gcd(max_groups, channels), channels)


class BottleneckProjection(nn.Module):
    """Residual bottleneck (1x1 -> 3x3 -> 1x1, GroupNorm) aligning one feature type to the common width (Phi)."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int = 96):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, bottleneck_channels, 1, bias=False),
            _group_norm(bottleneck_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck_channels, bottleneck_channels, 3, padding=1, bias=False),
            _group_norm(bottleneck_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck_channels, out_channels, 1, bias=False),
            _group_norm(out_channels),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), _group_norm(out_channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _blocks_per_level(feature_channels: FeatureChannels, num_timesteps: int) -> list[int]:
    counts = []
    for level, channels in enumerate(feature_channels):
        if len(channels) == 0 or len(channels) % num_timesteps:
            raise ValueError(
                f"pyramid level {level} holds {len(channels)} maps, not a positive multiple of "
                f"num_timesteps={num_timesteps}"
            )
        per_block = len(channels) // num_timesteps
        for t in range(1, num_timesteps):
            if channels[t * per_block : (t + 1) * per_block] != channels[:per_block]:
                raise ValueError(f"pyramid level {level}: timesteps do not share one block layout {channels}")
        counts.append(per_block)
    return counts


class _ProjectedFusion(nn.Module):
    """Shared part of the weighted fusions: one projection per (level, block), shared across timesteps."""

    def __init__(
        self,
        feature_channels: FeatureChannels,
        num_timesteps: int,
        out_channels: int = 384,
        bottleneck_channels: int = 96,
    ):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.out_channels = out_channels
        self.blocks_per_level = _blocks_per_level(feature_channels, num_timesteps)
        self.projections = nn.ModuleList(
            nn.ModuleList(
                BottleneckProjection(channels[b], out_channels, bottleneck_channels) for b in range(blocks)
            )
            for channels, blocks in zip(feature_channels, self.blocks_per_level, strict=True)
        )
        self.aux_loss = torch.zeros(())

    def project(self, level: int, maps: list[Tensor]) -> Tensor:
        """Projected maps of one level stacked as ``(B, K, C, h, w)``, K = timesteps x blocks."""
        blocks = self.blocks_per_level[level]
        return torch.stack([self.projections[level][j % blocks](m) for j, m in enumerate(maps)], dim=1)


class GlobalWeightedFusion(_ProjectedFusion):
    """Eq. 1: a learnable scalar per (timestep, block) and level, softmax-normalised over the level's maps."""

    def __init__(self, feature_channels: FeatureChannels, num_timesteps: int, **kwargs):
        super().__init__(feature_channels, num_timesteps, **kwargs)
        self.logits = nn.ParameterList(
            nn.Parameter(torch.zeros(len(channels))) for channels in feature_channels
        )

    def level_weights(self, level: int) -> Tensor:
        return self.logits[level].softmax(dim=0)

    def forward(self, pyramid: list[list[Tensor]]) -> list[Tensor]:
        fused = []
        for level, maps in enumerate(pyramid):
            weights = self.level_weights(level).view(1, -1, 1, 1, 1)
            fused.append((weights * self.project(level, maps)).sum(dim=1))
        self.aux_loss = fused[0].new_zeros(())
        return fused


class LocalizedWeightedFusion(_ProjectedFusion):
    """Eq. 2: a small conv gate on the mean projected feature gives per-pixel softmax weights over the maps."""

    def __init__(
        self, feature_channels: FeatureChannels, num_timesteps: int, gate_reduction: int = 4, **kwargs
    ):
        super().__init__(feature_channels, num_timesteps, **kwargs)
        hidden = max(self.out_channels // gate_reduction, 1)
        self.gates = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(self.out_channels, hidden, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, len(channels), 1),
            )
            for channels in feature_channels
        )

    def pixel_weights(self, level: int, projected: Tensor) -> Tensor:
        """Per-pixel weights ``(B, K, h, w)`` summing to one over the K maps."""
        return self.gates[level](projected.mean(dim=1)).softmax(dim=1)

    def forward(self, pyramid: list[list[Tensor]]) -> list[Tensor]:
        fused = []
        for level, maps in enumerate(pyramid):
            projected = self.project(level, maps)
            weights = self.pixel_weights(level, projected).unsqueeze(2)
            fused.append((weights * projected).sum(dim=1))
        self.aux_loss = fused[0].new_zeros(())
        return fused


class MixtureOfExpertsLayer(nn.Module):
    """Experts over one level's concatenated block features, routed per image (conv gate + global pooling).

    Routing is dense (softmax over all experts) for ``dense_warmup_steps`` training forwards, then top-k: only the k
    best experts run for each image and their gate values are renormalised. The step counter advances in training
    only, so validation never changes when routing turns sparse.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_experts: int = 8,
        top_k: int = 2,
        dense_warmup_steps: int = 500,
        bottleneck_channels: int = 96,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must lie in [1, num_experts={num_experts}]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.dense_warmup_steps = dense_warmup_steps
        self.experts = nn.ModuleList(
            BottleneckProjection(in_channels, out_channels, bottleneck_channels) for _ in range(num_experts)
        )
        self.gate = nn.Sequential(
            nn.Conv2d(in_channels, num_experts, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.register_buffer("routing_step", torch.zeros((), dtype=torch.long))

    @property
    def sparse(self) -> bool:
        return int(self.routing_step) >= self.dense_warmup_steps

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Gate weights ``(B, E)`` (zero for unrouted experts) and the dense probabilities for load balancing."""
        probs = self.gate(x).softmax(dim=-1)
        if not self.sparse:
            return probs, probs
        top_values, top_index = probs.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(
            -1, top_index, top_values / top_values.sum(-1, keepdim=True)
        )
        return weights, probs

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        weights, probs = self.route(x)
        output = None
        for e, expert in enumerate(self.experts):
            rows = weights[:, e].nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            contribution = weights[rows, e].view(-1, 1, 1, 1) * expert(x[rows])
            if output is None:
                output = x.new_zeros((x.shape[0], *contribution.shape[1:]))
            output = output.index_add(0, rows, contribution)
        # Switch-Transformer balance loss: E * sum_e (share of routed slots) * (mean gate probability).
        routed = (weights > 0).float()
        routed_share = routed.sum(dim=0) / routed.sum()
        balance = self.num_experts * (routed_share * probs.mean(dim=0)).sum()
        if self.training:
            self.routing_step += 1
        return output, balance


class MoEFusion(nn.Module):
    """Sec. 3.4: per level and timestep, concatenate the block features, one shared MoE layer, sum over timesteps."""

    def __init__(
        self,
        feature_channels: FeatureChannels,
        num_timesteps: int,
        out_channels: int = 384,
        num_experts: int = 8,
        top_k: int = 2,
        dense_warmup_steps: int = 500,
        bottleneck_channels: int = 96,
        balance_loss_weight: float = 0.01,
    ):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.out_channels = out_channels
        self.balance_loss_weight = balance_loss_weight
        self.blocks_per_level = _blocks_per_level(feature_channels, num_timesteps)
        self.layers = nn.ModuleList(
            MixtureOfExpertsLayer(
                sum(channels[:blocks]),
                out_channels,
                num_experts,
                top_k,
                dense_warmup_steps,
                bottleneck_channels,
            )
            for channels, blocks in zip(feature_channels, self.blocks_per_level, strict=True)
        )
        self.aux_loss = torch.zeros(())

    def forward(self, pyramid: list[list[Tensor]]) -> list[Tensor]:
        fused, balance_terms = [], []
        for level, maps in enumerate(pyramid):
            blocks = self.blocks_per_level[level]
            level_sum = None
            for t in range(self.num_timesteps):
                joint = torch.cat(maps[t * blocks : (t + 1) * blocks], dim=1)
                output, balance = self.layers[level](joint)
                balance_terms.append(balance)
                level_sum = output if level_sum is None else level_sum + output
            fused.append(level_sum)
        self.aux_loss = self.balance_loss_weight * torch.stack(balance_terms).mean()
        return fused


class SingleFeature(nn.Module):
    """Table 3's raw-feature baseline: one (timestep, block) map per level, linearly projected to the common width."""

    def __init__(
        self,
        feature_channels: FeatureChannels,
        num_timesteps: int,
        timestep_index: int = 0,
        block_index: int = 0,
        out_channels: int = 384,
    ):
        super().__init__()
        if not 0 <= timestep_index < num_timesteps:
            raise ValueError(
                f"timestep_index={timestep_index} outside the {num_timesteps} selected timesteps"
            )
        blocks_per_level = _blocks_per_level(feature_channels, num_timesteps)
        self.out_channels = out_channels
        self.entries = []
        for level, blocks in enumerate(blocks_per_level):
            if not 0 <= block_index < blocks:
                raise ValueError(f"block_index={block_index} but pyramid level {level} has {blocks} blocks")
            self.entries.append(timestep_index * blocks + block_index)
        self.projections = nn.ModuleList(
            nn.Conv2d(channels[j], out_channels, 1)
            for channels, j in zip(feature_channels, self.entries, strict=True)
        )
        self.aux_loss = torch.zeros(())

    def forward(self, pyramid: list[list[Tensor]]) -> list[Tensor]:
        fused = [proj(maps[j]) for proj, maps, j in zip(self.projections, pyramid, self.entries, strict=True)]
        self.aux_loss = fused[0].new_zeros(())
        return fused


class ConcatFusion(nn.Module):
    """Table 3's simple-concatenation baseline: all maps of a level concatenated, linearly projected."""

    def __init__(self, feature_channels: FeatureChannels, num_timesteps: int, out_channels: int = 384):
        super().__init__()
        _blocks_per_level(feature_channels, num_timesteps)
        self.out_channels = out_channels
        self.projections = nn.ModuleList(
            nn.Conv2d(sum(channels), out_channels, 1) for channels in feature_channels
        )
        self.aux_loss = torch.zeros(())

    def forward(self, pyramid: list[list[Tensor]]) -> list[Tensor]:
        fused = [proj(torch.cat(maps, dim=1)) for proj, maps in zip(self.projections, pyramid, strict=True)]
        self.aux_loss = fused[0].new_zeros(())
        return fused
