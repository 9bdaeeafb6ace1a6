"""Conditioning adapter: shapes, gate, grid alignment, reference dropout, coarse-only ablation, size."""

import pytest
import torch

from networks.adapter import ConditioningAdapter

SEM_DIM, JOINT, POOLED = 8, 32, 16


def tiny_adapter(**overrides) -> ConditioningAdapter:
    """Paper grids (16x16 semantic tokens, 32x32 coarse image in 4x4 patches -> 8x8), tiny widths."""
    config = dict(
        semantic_dim=SEM_DIM, hidden_dim=24, joint_dim=JOINT, pooled_hidden_dim=20, pooled_dim=POOLED
    )
    config.update(overrides)
    return ConditioningAdapter(**config)


def test_output_shapes_and_gate_range():
    torch.manual_seed(0)
    adapter = tiny_adapter()
    out = adapter(torch.randn(3, 256, SEM_DIM), torch.rand(3, 3, 128, 128))
    assert out.tokens.shape == (3, 64, JOINT)
    assert out.pooled.shape == (3, POOLED)
    assert out.gate.shape == (3, 64)
    assert ((out.gate > 0) & (out.gate < 1)).all()
    assert 0.0 < out.gate.mean().item() < 1.0


def test_semantic_pattern_lands_on_matching_coarse_token():
    torch.manual_seed(0)
    adapter = tiny_adapter().eval()
    semantic, image = torch.randn(1, 256, SEM_DIM), torch.rand(1, 3, 128, 128)
    base = adapter(semantic, image).tokens

    changed = semantic.view(1, 16, 16, SEM_DIM).clone()
    changed[0, 6:8, 10:12] += 5.0  # 16x16 cells rows 6-7, cols 10-11 -> 8x8 cell (3, 5)
    moved = adapter(changed.view(1, 256, SEM_DIM), image).tokens
    semantic_changed = (moved - base).abs().sum(-1)[0].nonzero().squeeze(1).tolist()

    brighter = image.clone()
    brighter[0, :, 48:64, 80:96] = 1.0 - brighter[0, :, 48:64, 80:96]  # 128 px rows 48-63, cols 80-95
    coarse_changed = (
        (adapter(semantic, brighter).tokens - base).abs().sum(-1)[0].nonzero().squeeze(1).tolist()
    )
    assert semantic_changed == coarse_changed == [3 * 8 + 5]


def test_reference_dropout_uses_semantic_tokens_alone_per_sample():
    torch.manual_seed(0)
    adapter = tiny_adapter(reference_dropout=0.5).train()
    semantic, image = torch.randn(64, 256, SEM_DIM), torch.rand(64, 3, 32, 32)
    out = adapter(semantic, image)
    semantic_only = adapter.semantic_tokens_on_coarse_grid(adapter.semantic_norm(semantic))
    mixed = adapter.eval()(semantic, image).tokens
    dropped = torch.isclose(out.tokens, semantic_only, atol=1e-6).all(-1).all(-1)
    kept = torch.isclose(out.tokens, mixed, atol=1e-6).all(-1).all(-1)
    assert (dropped ^ kept).all()  # every sample is one or the other
    assert 10 < int(dropped.sum()) < 54
    torch.testing.assert_close(mixed, adapter(semantic, image).tokens)  # no dropout in eval


def test_coarse_only_ablation():
    torch.manual_seed(0)
    adapter = tiny_adapter(semantic_dim=None, reference_dropout=0.0)
    out = adapter(None, torch.rand(2, 3, 128, 128))
    assert out.tokens.shape == (2, 64, JOINT) and out.pooled.shape == (2, POOLED) and out.gate is None
    with pytest.raises(ValueError, match="coarse-only"):
        adapter(torch.randn(2, 256, SEM_DIM), torch.rand(2, 3, 128, 128))
    with pytest.raises(ValueError, match="semantic_dim: null"):
        tiny_adapter()(None, torch.rand(2, 3, 128, 128))
    with pytest.raises(ValueError, match="reference_dropout=0"):
        tiny_adapter(semantic_dim=None)


def test_rejects_misaligned_grids_and_wrong_tokens():
    with pytest.raises(ValueError, match="cannot be aligned"):
        tiny_adapter(semantic_grid=12)
    with pytest.raises(ValueError, match=r"\(2, 256, 8\)"):
        tiny_adapter()(torch.randn(2, 64, SEM_DIM), torch.rand(2, 3, 128, 128))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    adapter = tiny_adapter(reference_dropout=0.0).train()
    out = adapter(torch.randn(2, 256, SEM_DIM), torch.rand(2, 3, 64, 64))
    (out.tokens.square().mean() + out.pooled.square().mean()).backward()
    missing = [name for name, p in adapter.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_full_size_parameter_count():
    """Paper: ~25M. Ours at full size (768 -> 4096 tokens, 2048 pooled, per-token gate) is counted here."""

    def linear(i, o):
        return i * o + o

    def token_mlp(i, h, o):
        return linear(i, h) + 2 * h + linear(h, h) + 2 * h + linear(h, o) + 2 * o

    semantic = 2 * 768 + 256 * 768 + token_mlp(768, 1024, 4096) + linear(2 * 4096, 1)
    coarse = 64 * 48 + token_mlp(48, 1024, 4096)
    pooled = linear(768, 1024) + linear(1024, 2048)
    count = sum(p.numel() for p in ConditioningAdapter().parameters())
    print(f"ConditioningAdapter full-size parameters: {count:,}")
    assert count == semantic + coarse + pooled == 14_454_273
