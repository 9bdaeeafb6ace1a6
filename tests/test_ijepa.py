"""I-JEPA networks, masking, EMA target encoder and the hybrid I-JEPA loss, at tiny sizes."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

from metrics.losses import HybridIJEPALoss
from networks.ijepa import (
    EMATargetEncoder,
    EmbeddingProjectionHead,
    IJEPAEncoder,
    IJEPAPredictor,
    MomentumSchedule,
    MultiBlockMaskGenerator,
    patch_token_validity,
    pool_patch_embedding,
)

IMG, PATCH, GRID, DIM = 32, 8, 4, 32


def tiny_encoder() -> IJEPAEncoder:
    return IJEPAEncoder(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=4)


def tiny_predictor() -> IJEPAPredictor:
    return IJEPAPredictor(grid_size=GRID, in_dim=DIM, width=16, depth=2, num_heads=4, out_dim=DIM)


# ---------------------------------------------------------------- encoder / predictor


def test_encoder_returns_patch_tokens_with_fixed_sincos_positions():
    torch.manual_seed(0)
    encoder = tiny_encoder()
    tokens = encoder(torch.rand(2, 3, IMG, IMG))
    assert tokens.shape == (2, GRID * GRID, DIM)  # no CLS token
    expected_pos = build_sincos2d_pos_embed([GRID, GRID], dim=DIM)
    torch.testing.assert_close(encoder.pos_embed[0], expected_pos)
    assert "pos_embed" not in dict(encoder.named_parameters())
    assert not any("pos_embed" in key for key in encoder.state_dict())


def test_encoder_context_ignores_dropped_patches():
    torch.manual_seed(0)
    encoder = tiny_encoder().eval()
    image = torch.rand(2, 3, IMG, IMG)
    keep = torch.tensor([[0, 1, 5, 6, 15], [2, 3, 8, 9, 10]])
    changed = image.clone()
    changed[:, :, 24:32, 0:8] = 1.0 - changed[:, :, 24:32, 0:8]  # patch 12, in neither context
    out, out_changed = encoder(image, keep), encoder(changed, keep)
    assert out.shape == (2, 5, DIM)
    torch.testing.assert_close(out, out_changed)
    assert not torch.allclose(encoder(image), encoder(changed))


def test_encoder_rejects_wrong_image_size():
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tiny_encoder()(torch.rand(1, 3, 16, 16))


def test_predictor_shapes_and_positions():
    torch.manual_seed(0)
    predictor = tiny_predictor().eval()
    context_idx = torch.tensor([[0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15]])
    context = torch.randn(2, 6, DIM)
    targets = torch.tensor([[7, 9], [0, 3]])
    assert predictor(context, context_idx, targets).shape == (2, 2, DIM)
    everything = predictor(context, context_idx)
    assert everything.shape == (2, GRID * GRID, DIM)
    # Mask tokens differ only by their position, so different positions must give different predictions.
    assert not torch.allclose(everything[:, 0], everything[:, 1])
    assert predictor(torch.randn(2, GRID * GRID, DIM)).shape == (2, GRID * GRID, DIM)
    with pytest.raises(ValueError, match="3 context tokens but 6 context positions"):
        predictor(torch.randn(2, 3, DIM), context_idx)


def test_gradients_reach_encoder_predictor_and_head_not_target():
    torch.manual_seed(0)
    encoder, predictor, head = tiny_encoder(), tiny_predictor(), EmbeddingProjectionHead(DIM, 8)
    target_encoder = EMATargetEncoder(encoder)
    masks = MultiBlockMaskGenerator(grid_size=GRID, min_keep=1)
    context_idx, _ = masks(2, torch.Generator().manual_seed(0))
    image, future = torch.rand(2, 3, IMG, IMG), torch.rand(2, 3, IMG, IMG)
    predicted = predictor(encoder(image, context_idx), context_idx)
    embedding = torch.randn(2, 8, IMG, IMG)
    terms = HybridIJEPALoss()(
        head(predicted),
        pool_patch_embedding(embedding, PATCH),
        torch.tensor([True, True]),
        predicted,
        target_encoder(future),
    )
    terms["total"].backward()
    for module in (encoder, predictor, head):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in target_encoder.parameters())


# ---------------------------------------------------------------- targets


def test_pool_patch_embedding_row_major_means_and_layer_norm():
    embedding = torch.zeros(1, 2, 16, 16)
    embedding[0, 0, 0:8, 8:16] = 4.0  # grid cell (0, 1) -> token 1
    embedding[0, 1, 8:12, 0:8] = 2.0  # half of cell (1, 0) -> token 2, mean 1
    tokens = pool_patch_embedding(embedding, 8, normalize=False)
    expected = torch.zeros(1, 4, 2)
    expected[0, 1, 0] = 4.0
    expected[0, 2, 1] = 1.0
    torch.testing.assert_close(tokens, expected)
    normed = pool_patch_embedding(torch.randn(2, 6, 16, 16), 8)
    torch.testing.assert_close(normed.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="patch_size=8"):
        pool_patch_embedding(torch.zeros(1, 2, 12, 16), 8)


def test_patch_token_validity_marks_patches_with_any_invalid_pixel():
    valid = torch.ones(1, 16, 16, dtype=torch.bool)
    valid[0, 9, 3] = False  # cell (1, 0) -> token 2
    assert patch_token_validity(valid, 8).tolist() == [[True, True, False, True]]


# ---------------------------------------------------------------- EMA


def test_linear_momentum_schedule_endpoints():
    schedule = MomentumSchedule()
    assert schedule(0, 1000) == pytest.approx(0.999)
    assert schedule(500, 1000) == pytest.approx(0.9995)
    assert schedule(1000, 1000) == pytest.approx(1.0)
    assert schedule(5000, 1000) == pytest.approx(1.0)


def test_cosine_momentum_schedule_endpoints():
    schedule = MomentumSchedule(schedule="cosine")
    assert schedule(0, 100) == pytest.approx(0.999)
    assert schedule(25, 100) == pytest.approx(1.0 - 0.001 * (1 + math.cos(math.pi / 4)) / 2)
    assert schedule(50, 100) == pytest.approx(0.9995)
    assert schedule(100, 100) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'linear' or 'cosine'"):
        MomentumSchedule(schedule="step")


def test_ema_update_arithmetic_and_frozen_target():
    torch.manual_seed(0)
    online = tiny_encoder()
    target = EMATargetEncoder(online)
    assert all(not p.requires_grad for p in target.parameters())
    before = {name: p.clone() for name, p in target.encoder.named_parameters()}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    target.update(online, momentum=0.9)
    for name, p in online.named_parameters():
        torch.testing.assert_close(
            dict(target.encoder.named_parameters())[name], 0.9 * before[name] + 0.1 * p
        )
    target.update(online, momentum=1.0)  # the end of the schedule freezes the target
    target.train()
    assert not target.training and not target.encoder.training
    assert not target(torch.rand(1, 3, IMG, IMG)).requires_grad


# ---------------------------------------------------------------- masks


def block_rectangle(indices: torch.Tensor, grid: int) -> tuple[int, int]:
    """(height, width) of the rectangle spanned by a token set; asserts the set fills it."""
    rows, cols = indices // grid, indices % grid
    height = int(rows.max() - rows.min() + 1)
    width = int(cols.max() - cols.min() + 1)
    assert height * width == len(indices), "block is not a full rectangle"
    return height, width


def test_masks_respect_scale_aspect_and_shapes():
    grid = 16
    masks = MultiBlockMaskGenerator(grid_size=grid)
    generator = torch.Generator().manual_seed(0)
    slack = grid / 2 / grid**2  # rounding a block's width loses/gains at most half a cell per row
    aspects = []
    for _ in range(200):
        context, target = masks(3, generator)
        assert context.dtype == torch.long and context.shape[0] == target.shape[0] == 3
        for ctx, tgt in zip(context, target, strict=True):
            for indices in (ctx, tgt):
                assert torch.equal(indices, indices.unique())  # sorted, no repeats
                assert 0 <= indices.min() and indices.max() < grid**2
            block_rectangle(ctx, grid)
            assert 0.7 - slack <= len(ctx) / grid**2 <= 1.0
            height, width = block_rectangle(tgt, grid)
            assert 0.2 - slack <= len(tgt) / grid**2 <= 0.5 + slack
            aspects.append(height / width)
    assert min(aspects) >= 0.75 * 0.8 and max(aspects) <= 1.5 * 1.25
    assert min(aspects) < 0.9 and max(aspects) > 1.3  # the whole aspect range is used


def test_masks_min_keep_and_validation():
    masks = MultiBlockMaskGenerator(grid_size=16, target_scale=(0.05, 0.1), min_keep=4)
    generator = torch.Generator().manual_seed(1)
    assert min(masks(4, generator)[1].shape[1] for _ in range(200)) >= 4
    with pytest.raises(ValueError, match="min_keep=6"):
        MultiBlockMaskGenerator(grid_size=16, target_scale=(0.01, 0.02), min_keep=6)
    with pytest.raises(ValueError, match="context_scale"):
        MultiBlockMaskGenerator(context_scale=(0.7, 1.2))


def test_masks_take_their_grid_later_and_check_it_then():
    masks = MultiBlockMaskGenerator(target_scale=(0.01, 0.02), min_keep=6)  # no grid yet: nothing to check
    with pytest.raises(ValueError, match="no grid_size"):
        masks(2)
    with pytest.raises(ValueError, match="min_keep=6"):
        masks.set_grid_size(16)
    masks = MultiBlockMaskGenerator(min_keep=1)
    masks.set_grid_size(8)
    context, target = masks(2, torch.Generator().manual_seed(0))
    assert int(context.max()) < 64 and int(target.max()) < 64


def test_masks_union_of_blocks_and_reproducibility():
    masks = MultiBlockMaskGenerator(grid_size=8, num_target_blocks=3, min_keep=1)
    first = masks(5, torch.Generator().manual_seed(3))
    second = masks(5, torch.Generator().manual_seed(3))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    targets = first[1]
    assert all(torch.equal(row, row.unique()) for row in targets)


# ---------------------------------------------------------------- hybrid loss


def test_hybrid_loss_terms_on_known_values():
    pred = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    target = torch.tensor([[[0.0, 1.0], [2.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    features_pred = torch.tensor([[[1.0, -1.0]] * 2] * 2)
    features_target = torch.tensor([[[-1.0, 1.0]] * 2, [[1.0, -1.0]] * 2])
    loss = HybridIJEPALoss()
    terms = loss(pred, target, torch.tensor([True, True]), features_pred, features_target)
    # |pred - target| per token (mean over channels): sample 0: 1, 0.5; sample 1: 0, 0.
    assert terms["l1"].item() == pytest.approx(1.5 / 4)
    # cosine per token: 0, 1, 1, 1 -> 1 - cos: 1, 0, 0, 0.
    assert terms["cosine"].item() == pytest.approx(1 / 4)
    # token std per channel: pred all 0 (+eps); target sample 0: std([0, 2]) = sqrt(2), std([1, 0]) = sqrt(0.5).
    eps_std = math.sqrt(1e-6)
    expected_spatial = ((math.sqrt(2 + 1e-6) - eps_std) ** 2 + (math.sqrt(0.5 + 1e-6) - eps_std) ** 2) / 2 / 2
    assert terms["spatial"].item() == pytest.approx(expected_spatial, rel=1e-5)
    # means: pred (1, 0), (0, 1); target (1, 0.5), (0, 1); logits = cos / 0.1.
    cos_01 = 1 / math.sqrt(1.25)  # pred 0 vs target 0
    cos_02 = 0.5 / math.sqrt(1.25)  # pred 1 vs target 0
    ce_0 = -math.log(math.exp(cos_01 / 0.1) / (math.exp(cos_01 / 0.1) + math.exp(0.0)))
    ce_1 = -math.log(math.exp(1 / 0.1) / (math.exp(cos_02 / 0.1) + math.exp(1 / 0.1)))
    assert terms["contrastive"].item() == pytest.approx((ce_0 + ce_1) / 2, rel=1e-5)
    # layer-normed features: sample 0 opposite signs -> |2| per channel; sample 1 equal -> 0.
    assert terms["feature"].item() == pytest.approx(1.0, rel=1e-4)
    weights = {"l1": 20.0, "cosine": 2.0, "spatial": 2.0, "contrastive": 0.5, "feature": 5.0}
    expected_total = sum(w * terms[name].item() for name, w in weights.items())
    assert terms["total"].item() == pytest.approx(expected_total, rel=1e-6)


def test_hybrid_loss_skips_samples_without_embedding():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    features_pred, features_target = torch.randn(3, 4, 10), torch.randn(3, 4, 10)
    has = torch.tensor([True, False, True])
    corrupted = target.clone()
    corrupted[1] = 0.0  # what the DataModule puts where there is no embedding
    loss = HybridIJEPALoss()
    with_gap = loss(pred, corrupted, has, features_pred, features_target)
    subset = [0, 2]
    kept = loss(pred[subset], target[subset], has[subset], features_pred[subset], features_target[subset])
    for name in ("l1", "cosine", "spatial", "contrastive"):
        torch.testing.assert_close(with_gap[name], kept[name])
    everyone = loss(pred, target, torch.ones(3, dtype=torch.bool), features_pred, features_target)
    torch.testing.assert_close(with_gap["feature"], everyone["feature"])  # feature term uses every sample
    assert with_gap["l1"] != everyone["l1"]


def test_hybrid_loss_without_any_embedding_is_zero_and_finite():
    pred = torch.randn(2, 4, 6, requires_grad=True)
    features_pred = torch.randn(2, 4, 10, requires_grad=True)
    terms = HybridIJEPALoss()(
        pred, torch.zeros(2, 4, 6), torch.tensor([False, False]), features_pred, torch.randn(2, 4, 10)
    )
    for name in ("l1", "cosine", "spatial", "contrastive"):
        assert terms[name].item() == 0.0
    assert terms["feature"].item() > 0
    terms["total"].backward()
    assert pred.grad is None or (torch.isfinite(pred.grad).all() and pred.grad.abs().sum() == 0)
    assert torch.isfinite(features_pred.grad).all()


def test_hybrid_loss_token_validity_and_detached_targets():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    features_target = torch.randn(2, 4, 10, requires_grad=True)
    features_pred = torch.randn(2, 4, 10, requires_grad=True)
    valid = torch.tensor([[True, True, False, True], [True, False, True, True]])
    broken = target.clone()
    broken[~valid] = 1e6
    loss = HybridIJEPALoss()
    masked = loss(pred, broken, torch.tensor([True, True]), features_pred, features_target, token_valid=valid)
    reference = F.l1_loss(pred[valid], target[valid])
    torch.testing.assert_close(masked["l1"], reference)
    masked["total"].backward()
    assert features_target.grad is None
