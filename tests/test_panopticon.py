"""Panopticon as the Sat-JEPA-Diff encoder: torchgeo's architecture, local weights, the I-JEPA grid, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchgeo.models.panopticon import Panopticon

from lightning_cli import main
from networks.panopticon import PanopticonEncoder

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, depth=1, num_heads=2, attn_dim=48, attn_heads=4)


def tiny_encoder(**overrides) -> PanopticonEncoder:
    torch.manual_seed(0)
    return PanopticonEncoder(**{"img_size": 64, "grid_size": 8, **TINY, **overrides})


def test_default_build_has_torchgeo_panopticon_state_dict():
    """At its defaults the encoder's ViT takes the published checkpoint as torchgeo's Panopticon does."""
    with torch.device("meta"):
        ours = PanopticonEncoder(img_size=128).vit.state_dict()
        reference = Panopticon(img_size=224).model.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}


def test_tokens_follow_the_predictor_grid():
    encoder = tiny_encoder()
    image = torch.rand(2, 3, 64, 64)
    assert encoder(image).shape == (2, 64, 32)
    keep = torch.tensor([[0, 9, 63], [1, 2, 3]])
    assert encoder(image, keep).shape == (2, 3, 32)
    assert encoder.img_size // encoder.grid_size == 8  # ForecastModule's pixels per token
    with pytest.raises(ValueError, match="expects images"):
        encoder(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="not divisible by grid_size"):
        tiny_encoder(img_size=60)


def test_token_index_names_the_same_window_cell_as_the_ijepa_grid():
    """Token row * grid + col sees the window's 8 x 8 px cell (row, col), as the masks and pooled targets assume."""
    encoder = tiny_encoder()
    image = torch.rand(1, 3, 64, 64)
    changed = image.clone()
    changed[..., 2 * 8 : 3 * 8, 5 * 8 : 6 * 8] += 0.5  # cell (row 2, col 5)
    with torch.no_grad():
        shift = (encoder.patch_tokens(changed) - encoder.patch_tokens(image)).norm(dim=-1)[0]
    assert int(shift.argmax()) == 2 * 8 + 5
    assert (
        shift[2 * 8 + 5] > 3 * shift.topk(2).values[1]
    )  # the resize blurs only the cell's edge into neighbours


def test_wavelengths_reach_the_channel_attention():
    image = torch.rand(1, 3, 64, 64)
    red_first = tiny_encoder()(image)
    assert not torch.allclose(red_first, tiny_encoder(wavelengths=[492.4, 559.8, 664.6])(image))


def test_weights_load_from_a_local_file_with_position_embedding_resampled(tmp_path):
    source = tiny_encoder(grid_size=4, img_size=64)
    state = dict(source.vit.state_dict(), mask_token=torch.zeros(1, 32))  # as in the published teacher file
    path = tmp_path / "panopticon.pth"
    torch.save(state, path)

    same_grid = tiny_encoder(grid_size=4, weights_path=str(path))
    image = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(same_grid(image), source(image))

    finer = tiny_encoder(grid_size=8, weights_path=str(path))
    assert finer.vit.pos_embed.shape == (1, 1 + 64, 32)
    torch.testing.assert_close(finer.vit.pos_embed[:, :1], source.vit.pos_embed[:, :1])
    torch.testing.assert_close(finer.vit.blocks[0].attn.qkv.weight, source.vit.blocks[0].attn.qkv.weight)


def test_missing_weights_file_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.init_args\.encoder\.init_args\.weights_path"):
        tiny_encoder(weights_path=str(tmp_path / "absent.pth"))


def test_cli_fits_and_tests_the_tiny_panopticon_encoder(tmp_path):
    """The tiny overlay on the I-JEPA stage: 2 training steps with masks and EMA, then test, on the demo data."""
    args = [
        "--config", str(REPO_ROOT / "configs" / "tiny" / "ijepa_only.yaml"),
        "--config", str(REPO_ROOT / "configs" / "tiny" / "panopticon_encoder.yaml"),
        "--data.init_args.root", str(REPO_ROOT / "data" / "demo"),
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    fit = main(["fit", *args, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                "--trainer.limit_val_batches", "1"])  # fmt: skip
    module = fit.model
    assert isinstance(module.encoder, PanopticonEncoder) and module.encoder.img_size == 64
    assert module.global_step == 2
    online = module.encoder.vit.blocks[0].attn.qkv.weight
    target = module.target_encoder.encoder.vit.blocks[0].attn.qkv.weight
    assert not torch.equal(online, target)  # trained online encoder, EMA-lagged target
    test = main(["test", *args, "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"),
                 "--trainer.limit_test_batches", "1"])  # fmt: skip
    metrics = test.trainer.callback_metrics
    assert "test/ijepa/pred_std" in metrics and torch.isfinite(metrics["test/ijepa/pred_std"])
