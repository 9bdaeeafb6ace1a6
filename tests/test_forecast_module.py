"""Sat-JEPA-Diff ForecastModule on the tiny config: gradients, optimizer, checkpoints, CLI fit/test/predict."""

from __future__ import annotations

from pathlib import Path

import pytest
import rasterio
import torch

from lightning_cli import main
from lightning_modules.forecast import ForecastModule
from lightning_modules.schedules import warmup_cosine

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny" / "forecast.yaml")
TINY_IJEPA_ONLY = str(REPO_ROOT / "configs" / "tiny" / "ijepa_only.yaml")
FAST = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=1",
    f"--data.init_args.root={REPO_ROOT / 'data' / 'demo'}",
]


@pytest.fixture(autouse=True)
def run_from_repo_root(monkeypatch):
    """The tiny config names the tokenizer folder relative to the repository root, like every CLI run."""
    monkeypatch.chdir(REPO_ROOT)


def build_module(*overrides: str) -> ForecastModule:
    cli = main(["--config", TINY_CONFIG, *FAST, *overrides], run=False)
    return cli.model


def toy_batch(batch_size: int = 2, size: int = 64) -> dict:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(batch_size, 1, 3, size, size, generator=generator)
    mask = torch.ones(batch_size, size, size, dtype=torch.bool)
    mask[0, :8] = False
    return {
        "image": image,
        "target": (image[:, -1] * 0.9 + 0.05).clamp(0, 1),
        "mask": mask,
        "embedding": torch.randn(batch_size, 64, size, size, generator=generator),
        "has_embedding": torch.tensor([True] * (batch_size - 1) + [False]),
    }


def trainable_names(module: ForecastModule) -> set[str]:
    return {name for name, param in module.named_parameters() if param.requires_grad}


def is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


@pytest.fixture(scope="module")
def module() -> ForecastModule:
    return build_module()


def test_only_ijepa_adapter_and_lora_are_trainable(module):
    names = trainable_names(module)
    prefixes = {name.split(".")[0] for name in names}
    assert prefixes == {"backbone", "adapter", "encoder", "predictor", "projection_head"}
    assert all(is_lora(name) for name in names if name.startswith("backbone."))
    assert not any(p.requires_grad for p in module.target_encoder.parameters())
    assert not any(p.requires_grad for p in module.backbone.vae.parameters())


def test_training_step_gradients_reach_exactly_the_trainable_parts(module):
    module.zero_grad(set_to_none=True)
    module.train()
    loss = module.training_step(toy_batch(), 0)
    loss.backward()
    for name, param in module.named_parameters():
        if param.requires_grad:
            if ".lora_A." in name:  # B starts at zero (gaussian init), so A's first gradient is zero
                continue
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    lora_b = [p.grad for n, p in module.named_parameters() if ".lora_B." in n]
    assert any(g.abs().sum() > 0 for g in lora_b)
    assert module.encoder.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    module.zero_grad(set_to_none=True)


def test_ssim_term_back_propagates_through_the_decoder(module):
    module.zero_grad(set_to_none=True)
    module.train()
    frame = toy_batch()["image"][:, -1]
    terms = module.diffusion_terms(frame, module.predict_semantics(frame), toy_batch())
    assert set(terms) >= {"flow", "ssim", "total", "gate"}
    terms["ssim"].backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.named_parameters() if ".lora_B." in n
    )
    assert module.adapter.coarse_mlp[0].weight.grad.abs().sum() > 0
    module.zero_grad(set_to_none=True)


def test_detach_switch_stops_diffusion_gradient_at_ijepa():
    def encoder_gradient(detach: bool) -> torch.Tensor:
        module = build_module(
            f"--model.init_args.detach_ijepa_for_diffusion={str(detach).lower()}",
            *[
                f"--model.init_args.ijepa_loss.init_args.{key}_weight=0"
                for key in ("l1", "cosine", "spatial")
            ],
            *[f"--model.init_args.ijepa_loss.init_args.{key}_weight=0" for key in ("contrastive", "feature")],
        )
        module.train()
        module.training_step(toy_batch(), 0).backward()
        grad = module.encoder.vit.patch_embed.proj.weight.grad
        return torch.zeros(1) if grad is None else grad

    assert encoder_gradient(detach=True).abs().sum() == 0
    assert encoder_gradient(detach=False).abs().sum() > 0


SD35_ONLY_OVERLAY = str(REPO_ROOT / "configs" / "ablations" / "sd35_only.yaml")


def test_coarse_only_ablation_trains_without_ijepa():
    """The shipped overlay turns the tiny Sat-JEPA-Diff into the paper's "Stable Diffusion 3.5" row."""
    cli = main(["--config", TINY_CONFIG, "--config", SD35_ONLY_OVERLAY, *FAST], run=False)
    module = cli.model
    assert not hasattr(module, "encoder") and module.model_name() == "Stable Diffusion 3.5"
    module.train()
    loss = module.training_step(toy_batch(), 0)
    loss.backward()
    assert module.adapter.coarse_mlp[0].weight.grad.abs().sum() > 0
    forecast = module.forecast(toy_batch()["image"])
    assert forecast.shape == (2, 3, 64, 64) and 0 <= forecast.min() and forecast.max() <= 1


def test_ijepa_stage_alone_builds_no_diffusion_parts():
    module = main(["--config", TINY_IJEPA_ONLY, *FAST], run=False).model
    assert module.backbone is None and module.adapter is None
    assert module.model_name() == "Sat-JEPA-Diff (I-JEPA only)"
    module.train()
    module.training_step(toy_batch(), 0).backward()
    assert module.predictor.head.weight.grad.abs().sum() > 0
    module.eval()
    logged = {}
    module.log_dict = lambda values, **_: logged.update(values)
    with torch.no_grad():
        module.validate_ijepa(toy_batch(), "val")
    assert {
        "val/ijepa/total",
        "val/ijepa/pred_std",
        "val/ijepa/embedding_cosine",
        "val/ijepa/embedding_l1",
    } <= set(logged)
    assert logged["val/ijepa/pred_std"] > 0


def test_missing_ijepa_networks_are_named(capsys):
    with pytest.raises(SystemExit):  # the CLI prints the constructor's error as one line and exits
        build_module("--model.init_args.encoder=null")
    assert "config keys ['encoder'] are not set" in capsys.readouterr().err


def test_forecast_is_reproducible_and_in_unit_range(module):
    module.eval()
    image = toy_batch()["image"]
    with torch.no_grad():
        first, second = module.forecast(image), module.forecast(image)
    assert torch.equal(first, second)
    assert first.min() >= 0 and first.max() <= 1


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10, 2e-5, 1e-4, 1e-6) == pytest.approx(2e-5)
    assert warmup_cosine(10, 100, 10, 2e-5, 1e-4, 1e-6) == pytest.approx(1e-4)
    assert warmup_cosine(100, 100, 10, 2e-5, 1e-4, 1e-6) == pytest.approx(1e-6)
    assert warmup_cosine(50, 100, 0, 0.04, 0.04, 0.4) == pytest.approx(0.22)


def test_cli_fit_test_predict_and_checkpoint_contents(tmp_path):
    root = tmp_path / "run"
    common = ["--config", TINY_CONFIG, *FAST, f"--trainer.default_root_dir={root}"]
    cli = main(["fit", *common])
    model, trainer = cli.model, cli.trainer

    optimizer = trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert all(p.ndim <= 1 for p in optimizer.param_groups[1]["params"])

    checkpoint_path = next(root.rglob("last.ckpt"))
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    assert all(is_lora(key) for key in state if key.startswith("backbone."))
    stored = sum(t.numel() for t in state.values())
    trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ema_count = sum(p.numel() for p in model.target_encoder.parameters())
    frozen_count = sum(p.numel() for n, p in model.backbone.named_parameters() if not is_lora(n))
    assert stored <= trainable_count + ema_count + 64  # a few metric buffers at most
    assert stored < trainable_count + ema_count + frozen_count

    reloaded = build_module()
    reloaded.on_load_checkpoint(checkpoint)
    reloaded.load_state_dict(checkpoint["state_dict"], strict=True)
    model.eval()
    reloaded.eval()
    image = toy_batch()["image"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.forecast(image), model.forecast(image), rtol=0, atol=0)

    main(["test", *common, f"--ckpt_path={checkpoint_path}"])
    assert (root / "test_results.csv").is_file()
    predict_dir = tmp_path / "predictions"
    main(
        ["predict", *common, f"--ckpt_path={checkpoint_path}", f"--model.init_args.predict_dir={predict_dir}"]
    )
    written = sorted(predict_dir.glob("*.tif"))
    assert written
    with rasterio.open(written[0]) as src:
        assert src.count == 3 and src.dtypes[0] == "float32" and src.crs is not None
