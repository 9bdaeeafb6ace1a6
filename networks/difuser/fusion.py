"""SatDiFuser fusion of multi-timestep, multi-block diffusion features (paper Sections 3.2-3.4, Table 3).

Every fusion maps a 4-level pyramid (``pyramid[level][j]``, entries timestep-major: ``j // blocks_in_level`` is the
timestep, ``j % blocks_in_level`` the block; see docs/DESIGN.md) to 4 maps of ``out_channels``. Each is built as
``Fusion(feature_channels, num_timesteps, **config)`` so the extractor supplies the channel layout and the config
only the fusion's own hyperparameters. After each forward, ``aux_loss`` holds a scalar in the autograd graph that
the training loss must add (MoE load balancing; zero for the others). ``SingleFeature`` also takes the extractor's
``block_layout`` (the kind and layer of each block), which the module passes to fusions that accept it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FeatureChannels = list[list[int]]
BlockLayout = list[list[tuple[str, int]]]


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
    """Eq. 1: a learnable scalar per (timestep, block) and level, softmax-normalised.

    ``weight_normalization`` ``global`` (default, as the reference code behind the paper's numbers) takes one
    softmax over every (timestep, block) pair of every level, so levels compete for weight; ``level`` normalises
    each level's weights separately (every fused level is then a convex combination of its maps).
    """

    def __init__(
        self,
        feature_channels: FeatureChannels,
        num_timesteps: int,
        weight_normalization: Literal["global", "level"] = "global",
        **kwargs,
    ):
        super().__init__(feature_channels, num_timesteps, **kwargs)
        if weight_normalization not in ("global", "level"):
            raise ValueError(
                f"weight_normalization must be 'global' or 'level', got {weight_normalization!r}"
            )
        self.weight_normalization = weight_normalization
        self.logits = nn.ParameterList(
            nn.Parameter(torch.zeros(len(channels))) for channels in feature_channels
        )

    def weights(self) -> list[Tensor]:
        """Per level, the weight of each of its maps."""
        if self.weight_normalization == "level":
            return [logits.softmax(dim=0) for logits in self.logits]
        joint = torch.cat(list(self.logits)).softmax(dim=0)
        return list(joint.split([len(logits) for logits in self.logits]))

    def level_weights(self, level: int) -> Tensor:
        return self.weights()[level]

    def forward(self, pyramid: list[list[Tensor]]) -> list[Tensor]:
        fused = []
        for level, (maps, weights) in enumerate(zip(pyramid, self.weights(), strict=True)):
            fused.append((weights.view(1, -1, 1, 1, 1) * self.project(level, maps)).sum(dim=1))
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

    Routing is dense (softmax over all experts) unless ``sparse``: then only the ``top_k`` best experts run for each
    image and their gate values are renormalised.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_experts: int = 8,
        top_k: int = 2,
        bottleneck_channels: int = 96,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must lie in [1, num_experts={num_experts}]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.experts = nn.ModuleList(
            BottleneckProjection(in_channels, out_channels, bottleneck_channels) for _ in range(num_experts)
        )
        self.gate = nn.Sequential(
            nn.Conv2d(in_channels, num_experts, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )

    def route(self, x: Tensor, sparse: bool) -> tuple[Tensor, Tensor]:
        """Gate weights ``(B, E)`` (zero for unrouted experts) and the dense probabilities for load balancing."""
        probs = self.gate(x).softmax(dim=-1)
        if not sparse:
            return probs, probs
        top_values, top_index = probs.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(
            -1, top_index, top_values / top_values.sum(-1, keepdim=True)
        )
        return weights, probs

    def forward(self, x: Tensor, sparse: bool) -> tuple[Tensor, Tensor]:
        weights, probs = self.route(x, sparse)
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
        return output, balance


class MoEFusion(nn.Module):
    """Sec. 3.4: per level and timestep, concatenate the block features, one shared MoE layer, sum over timesteps.

    Routing is dense for the first ``dense_warmup_steps`` optimizer steps, then top-k. The step is told by the
    training loop through ``set_training_step`` (``DiFuserModule`` passes ``trainer.global_step`` before each
    batch), so the switch never falls inside a step, whatever the number of timesteps, gradient accumulation or
    validation runs; it is stored with the module (a buffer) and so resumes with a checkpoint.
    """

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
        self.dense_warmup_steps = dense_warmup_steps
        self.balance_loss_weight = balance_loss_weight
        self.blocks_per_level = _blocks_per_level(feature_channels, num_timesteps)
        self.layers = nn.ModuleList(
            MixtureOfExpertsLayer(
                sum(channels[:blocks]), out_channels, num_experts, top_k, bottleneck_channels
            )
            for channels, blocks in zip(feature_channels, self.blocks_per_level, strict=True)
        )
        self.register_buffer("routing_step", torch.zeros((), dtype=torch.long))
        self.aux_loss = torch.zeros(())

    def set_training_step(self, step: int) -> None:
        """The number of optimizer steps taken so far."""
        self.routing_step.fill_(step)

    @property
    def sparse(self) -> bool:
        return int(self.routing_step) >= self.dense_warmup_steps

    def forward(self, pyramid: list[list[Tensor]]) -> list[Tensor]:
        fused, balance_terms = [], []
        sparse = self.sparse
        for level, maps in enumerate(pyramid):
            blocks = self.blocks_per_level[level]
            level_sum = None
            for t in range(self.num_timesteps):
                joint = torch.cat(maps[t * blocks : (t + 1) * blocks], dim=1)
                output, balance = self.layers[level](joint, sparse)
                balance_terms.append(balance)
                level_sum = output if level_sum is None else level_sum + output
            fused.append(level_sum)
        self.aux_loss = self.balance_loss_weight * torch.stack(balance_terms).mean()
        return fused


class SingleFeature(nn.Module):
    """Table 3's raw-feature baseline: one (timestep, block) map per level, linearly projected to the common width.

    The block is chosen by ``kind`` (``attn``, ``resnet_residual``, ``resnet_output``) and ``layer`` (its position
    among the level's blocks of that kind) at ``timestep_index``, using the extractor's ``block_layout``. A level
    that has no such block (SD's coarsest decoder level has no attention) is refused unless ``fallback_kind`` names
    the kind to use there instead.
    """

    def __init__(
        self,
        feature_channels: FeatureChannels,
        num_timesteps: int,
        block_layout: BlockLayout | None = None,
        kind: str = "attn",
        layer: int = 0,
        timestep_index: int = 0,
        fallback_kind: str | None = None,
        out_channels: int = 384,
    ):
        super().__init__()
        if not 0 <= timestep_index < num_timesteps:
            raise ValueError(
                f"timestep_index={timestep_index} outside the {num_timesteps} selected timesteps"
            )
        blocks_per_level = _blocks_per_level(feature_channels, num_timesteps)
        if block_layout is None or [len(b) for b in block_layout] != blocks_per_level:
            raise ValueError(
                "SingleFeature needs the extractor's block_layout (one (kind, layer) per level block)"
            )
        self.out_channels = out_channels
        self.entries = []
        for level, blocks in enumerate(block_layout):
            position = self._find(blocks, kind, layer)
            if position is None and fallback_kind is not None:
                position = self._find(blocks, fallback_kind, layer)
            if position is None:
                raise ValueError(
                    f"SingleFeature: pyramid level {level} has no {kind} block {layer} (it has {blocks}); choose "
                    "another kind/layer or set fallback_kind"
                )
            self.entries.append(timestep_index * len(blocks) + position)
        self.projections = nn.ModuleList(
            nn.Conv2d(channels[j], out_channels, 1)
            for channels, j in zip(feature_channels, self.entries, strict=True)
        )
        self.aux_loss = torch.zeros(())

    @staticmethod
    def _find(blocks: list[tuple[str, int]], kind: str, layer: int) -> int | None:
        matches = [
            i
            for i, (block_kind, block_layer) in enumerate(blocks)
            if (block_kind, block_layer) == (kind, layer)
        ]
        return matches[0] if matches else None

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
