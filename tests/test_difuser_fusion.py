"""Fusion modules and heads of SatDiFuser on hand-sized pyramids."""

import pytest
import torch

from networks.difuser import (
    ConcatFusion,
    GlobalWeightedFusion,
    LinearClassificationHead,
    LocalizedWeightedFusion,
    MoEFusion,
    SingleFeature,
    UPerNetHead,
)
from networks.difuser.fusion import MixtureOfExpertsLayer

# Two timesteps; levels hold 2, 2, 1, 1 blocks (finest first), as a tiny UNet's decoder might.
BLOCK_CHANNELS = [[8, 16], [16, 16], [32], [32]]
SIZES = [16, 8, 4, 2]
NUM_TIMESTEPS = 2
FEATURE_CHANNELS = [blocks * NUM_TIMESTEPS for blocks in BLOCK_CHANNELS]
# what the extractor reports for it: a ResNet and a self-attention on the two finer levels, a ResNet below
BLOCK_LAYOUT = [[("resnet_residual", 0), ("attn", 0)]] * 2 + [[("resnet_residual", 0)]] * 2


def make_pyramid(batch: int = 2, seed: int = 0) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(batch, c, size, size, generator=generator) for c in channels]
        for channels, size in zip(FEATURE_CHANNELS, SIZES, strict=True)
    ]


FUSIONS = [
    lambda: GlobalWeightedFusion(FEATURE_CHANNELS, NUM_TIMESTEPS, out_channels=24, bottleneck_channels=8),
    lambda: LocalizedWeightedFusion(FEATURE_CHANNELS, NUM_TIMESTEPS, out_channels=24, bottleneck_channels=8),
    lambda: MoEFusion(
        FEATURE_CHANNELS, NUM_TIMESTEPS, out_channels=24, num_experts=4, top_k=2, bottleneck_channels=8
    ),
    lambda: SingleFeature(
        FEATURE_CHANNELS,
        NUM_TIMESTEPS,
        BLOCK_LAYOUT,
        kind="resnet_residual",
        timestep_index=1,
        out_channels=24,
    ),
    lambda: ConcatFusion(FEATURE_CHANNELS, NUM_TIMESTEPS, out_channels=24),
]


@pytest.mark.parametrize("build", FUSIONS)
def test_fusion_keeps_pyramid_resolutions(build):
    fused = build()(make_pyramid())
    assert [tuple(x.shape) for x in fused] == [(2, 24, s, s) for s in SIZES]


def test_global_weights_sum_to_one_per_level():
    fusion = GlobalWeightedFusion(
        FEATURE_CHANNELS, NUM_TIMESTEPS, weight_normalization="level", out_channels=24, bottleneck_channels=8
    )
    with torch.no_grad():
        for logits in fusion.logits:
            logits.normal_()
    for level, channels in enumerate(FEATURE_CHANNELS):
        weights = fusion.level_weights(level)
        assert weights.shape == (len(channels),)
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_global_fusion_is_the_weighted_sum_of_projections():
    fusion = GlobalWeightedFusion(
        FEATURE_CHANNELS, NUM_TIMESTEPS, weight_normalization="level", out_channels=24, bottleneck_channels=8
    ).eval()
    with torch.no_grad():
        fusion.logits[2].copy_(torch.tensor([0.0, 100.0]))  # level 2: all weight on timestep 1
    pyramid = make_pyramid()
    expected = fusion.projections[2][0](pyramid[2][1])
    torch.testing.assert_close(fusion(pyramid)[2], expected, atol=1e-5, rtol=1e-4)


def test_localized_weights_sum_to_one_per_pixel():
    fusion = LocalizedWeightedFusion(FEATURE_CHANNELS, NUM_TIMESTEPS, out_channels=24, bottleneck_channels=8)
    pyramid = make_pyramid()
    projected = fusion.project(0, pyramid[0])
    weights = fusion.pixel_weights(0, projected)
    assert weights.shape == (2, len(FEATURE_CHANNELS[0]), SIZES[0], SIZES[0])
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, SIZES[0], SIZES[0]))


def test_moe_routes_to_exactly_k_experts_when_sparse():
    layer = MixtureOfExpertsLayer(16, 8, num_experts=4, top_k=2, bottleneck_channels=8)
    x = torch.randn(3, 16, 4, 4)
    dense, _ = layer.route(x, sparse=False)
    assert (dense > 0).sum(dim=-1).tolist() == [4, 4, 4]
    sparse, probs = layer.route(x, sparse=True)
    assert (sparse > 0).sum(dim=-1).tolist() == [2, 2, 2]
    torch.testing.assert_close(sparse.sum(dim=-1), torch.ones(3))
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(3))


def test_moe_routing_follows_the_optimizer_step_not_the_timestep_calls():
    """Three timesteps call each MoE layer three times per training step; the warm-up counts steps."""
    fusion = MoEFusion(
        FEATURE_CHANNELS,
        NUM_TIMESTEPS,
        out_channels=24,
        num_experts=4,
        dense_warmup_steps=2,
        bottleneck_channels=8,
    ).train()
    pyramid = make_pyramid()
    for step in range(2):
        fusion.set_training_step(step)
        fusion(pyramid)
        assert not fusion.sparse, step  # forwards alone never advance the routing
    fusion.set_training_step(2)
    assert fusion.sparse
    assert "routing_step" in fusion.state_dict()  # resumes with a checkpoint


def test_moe_balance_loss_is_in_the_graph():
    """Once routing is sparse the balance loss trains the gate (under dense routing it is the constant 1).

    One image routes to top_k of the 4 experts, so the routed shares are unbalanced: with every expert equally
    routed the Switch loss is a constant (zero gradient) by design, which a batch of two can hit by chance."""
    fusion = MoEFusion(FEATURE_CHANNELS, NUM_TIMESTEPS, out_channels=24, num_experts=4, bottleneck_channels=8)
    fusion.set_training_step(fusion.dense_warmup_steps)
    fusion(make_pyramid(batch=1))
    assert fusion.aux_loss.requires_grad and fusion.aux_loss.item() > 0
    fusion.aux_loss.backward()
    gate_grad = fusion.layers[0].gate[0].weight.grad
    assert gate_grad is not None and gate_grad.abs().sum() > 1e-6


def test_moe_balance_loss_is_minimal_for_uniform_routing():
    layer = MixtureOfExpertsLayer(16, 8, num_experts=4, top_k=2, bottleneck_channels=8)
    with torch.no_grad():
        layer.gate[0].weight.zero_()
        layer.gate[0].bias.zero_()
    _, balance = layer(torch.randn(2, 16, 4, 4), sparse=True)
    # Uniform probabilities: E * sum_e (share_e * 1/E) = 1 whatever the routing.
    torch.testing.assert_close(balance, torch.tensor(1.0))


def test_single_feature_selects_by_kind_and_refuses_a_level_without_it():
    with pytest.raises(ValueError, match="level 2 has no attn block 0.*fallback_kind"):
        SingleFeature(FEATURE_CHANNELS, NUM_TIMESTEPS, BLOCK_LAYOUT, kind="attn")
    fusion = SingleFeature(
        FEATURE_CHANNELS,
        NUM_TIMESTEPS,
        BLOCK_LAYOUT,
        kind="attn",
        timestep_index=1,
        fallback_kind="resnet_residual",
    )
    # timestep 1 of two-block levels: entries 2 + (attn at 1) = 3; one-block levels: entry 1 (the ResNet)
    assert fusion.entries == [3, 3, 1, 1]
    with pytest.raises(ValueError, match="block_layout"):
        SingleFeature(FEATURE_CHANNELS, NUM_TIMESTEPS)


def test_global_softmax_spans_every_level_like_the_reference():
    fusion = GlobalWeightedFusion(FEATURE_CHANNELS, NUM_TIMESTEPS, out_channels=24, bottleneck_channels=8)
    assert fusion.weight_normalization == "global"
    with torch.no_grad():
        for logits in fusion.logits:
            logits.normal_()
    weights = fusion.weights()
    torch.testing.assert_close(sum(w.sum() for w in weights), torch.tensor(1.0))
    joint = torch.cat([logits.detach() for logits in fusion.logits]).softmax(0)
    torch.testing.assert_close(torch.cat(weights).detach(), joint)


def test_fusion_rejects_inconsistent_layout():
    with pytest.raises(ValueError, match="level 0"):
        GlobalWeightedFusion([[8, 16, 8]] + FEATURE_CHANNELS[1:], NUM_TIMESTEPS)


def test_linear_head_shapes():
    fused = [torch.randn(2, 24, s, s) for s in SIZES]
    assert LinearClassificationHead(24, 5)(fused, (64, 64)).shape == (2, 5)


def test_upernet_upsamples_to_input_size():
    fused = [torch.randn(2, 24, s, s) for s in SIZES]
    head = UPerNetHead(24, 3, channels=16)
    logits = head(fused, (64, 64))
    assert logits.shape == (2, 3, 64, 64)
    logits.sum().backward()
    assert head.classifier.weight.grad is not None


@pytest.mark.parametrize("build", FUSIONS)
def test_fusion_reports_its_output_width(build):
    assert build().out_channels == 24
