"""The demo's trained tiny SD3 parts (data/weights/tiny_sd3, made by tools/train_demo_weights.py) and checkpoint."""

from __future__ import annotations

import tempfile

import pytest
import torch
from safetensors.torch import load_file

from lightning_cli.cli import main
from tests.conftest import REPO_ROOT
from tests.test_sd3 import build_tiny_backbone, tiny_backbone_args
from tools import train_demo_weights

WEIGHTS = REPO_ROOT / "data" / "weights" / "tiny_sd3"
TINY = REPO_ROOT / "configs" / "tiny"
VAE_TEST_PSNR_FLOOR = 32.0  # measured 33.7 dB on this batch (random weights: 6.5 dB), minus a margin
FORECAST_MARGIN_DB = 3.0  # the goal: within 3 dB of persistence


def psnr(decoded: torch.Tensor, target: torch.Tensor) -> float:
    mse = ((decoded.clamp(0, 1) - target) ** 2).flatten(1).mean(1)
    return float((-10 * torch.log10(mse)).mean())


@pytest.fixture(scope="module")
def test_batch() -> dict:
    """The first batch of the demo's test region (the same windows the demo tests on)."""
    with tempfile.TemporaryDirectory() as cache_dir:
        data = train_demo_weights.datamodule(cache_dir)
        data.setup("test")
        return next(iter(data.test_dataloader()))


@pytest.fixture(scope="module")
def trained_backbone():
    return build_tiny_backbone(trained=True)


def test_tiny_config_loads_the_shipped_weights(trained_backbone):
    for part, name in ((trained_backbone.vae, "vae"), (trained_backbone.transformer, "transformer")):
        shipped = load_file(WEIGHTS / f"{name}.safetensors")
        state = part.state_dict()
        for key, tensor in shipped.items():
            stem, leaf = key.rsplit(".", 1)  # LoRA wraps the attention projections as `base_layer`
            loaded = state.get(key, state.get(f"{stem}.base_layer.{leaf}"))
            assert loaded.dtype == torch.float32
            assert torch.equal(loaded, tensor), key
    latents = trained_backbone.encode(torch.rand(1, 3, 64, 64))
    assert latents.shape == (1, trained_backbone.latent_channels, 16, 16)


def test_trained_vae_reconstructs_a_real_test_window(trained_backbone, test_batch):
    target = test_batch["target"]
    with torch.no_grad():
        trained = psnr(trained_backbone.decode(trained_backbone.encode(target)), target)
        random = build_tiny_backbone()
        untrained = psnr(random.decode(random.encode(target)), target)
    assert trained > VAE_TEST_PSNR_FLOOR
    assert untrained < VAE_TEST_PSNR_FLOOR  # the threshold tells trained from random weights


def psnr_of_test_run(config: str, tmp_path, *extra: str) -> float:
    """``lightning_cli test`` of a tiny config on the first test batch of the demo data; its PSNR."""
    cli = main(
        [
            "test",
            "--config", str(TINY / config),
            "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path / config),
            "--trainer.limit_test_batches", "1",
            "--data.init_args.cache_dir", str(tmp_path / "manifest"),
            "--model.init_args.results_csv", str(tmp_path / "results.csv"),
            *extra,
        ]
    )  # fmt: skip
    return float(cli.trainer.callback_metrics["test/psnr"])


def test_shipped_checkpoint_forecasts_near_persistence(tmp_path):
    persistence = psnr_of_test_run("persistence.yaml", tmp_path)
    forecast = psnr_of_test_run("forecast.yaml", tmp_path, "--ckpt_path", str(WEIGHTS / "forecast.ckpt"))
    assert forecast > persistence - FORECAST_MARGIN_DB


def test_shipped_checkpoint_loads_from_its_own_hyperparameters():
    from lightning_modules import ForecastModule

    module = ForecastModule.load_from_checkpoint(WEIGHTS / "forecast.ckpt")
    shipped = load_file(WEIGHTS / "vae.safetensors")["decoder.conv_out.weight"]
    assert torch.equal(module.backbone.vae.decoder.conv_out.weight, shipped)


def test_missing_weights_name_their_config_key(tmp_path):
    for key in ("vae_weights", "transformer_weights"):
        with pytest.raises(FileNotFoundError, match=f"config key '{key}'"):
            build_tiny_backbone(trained=True, **{key: str(tmp_path / "missing.safetensors")})


def test_vae_latent_factors_must_match_the_trained_ones():
    vae = tiny_backbone_args()["vae"]
    vae["scaling_factor"] += 0.5
    with pytest.raises(ValueError, match="config key 'vae.scaling_factor'"):
        build_tiny_backbone(trained=True, vae=vae)


def test_training_script_writes_loadable_weights(tmp_path):
    figures = train_demo_weights.main(
        ["--out", str(tmp_path), "--vae-steps", "2", "--transformer-steps", "2", "--latent-crops", "4"]
        + ["--fine-tune-epochs", "0", "--threads", "1"]
    )
    vae = tiny_backbone_args()["vae"]
    vae.update(shift_factor=figures["shift_factor"], scaling_factor=figures["scaling_factor"])
    backbone = build_tiny_backbone(
        vae=vae,
        vae_weights=str(tmp_path / "vae.safetensors"),
        transformer_weights=str(tmp_path / "transformer.safetensors"),
    )
    assert torch.equal(
        backbone.vae.encoder.conv_in.weight, load_file(tmp_path / "vae.safetensors")["encoder.conv_in.weight"]
    )
    assert 0 < figures["vae_test_psnr"] < 60
