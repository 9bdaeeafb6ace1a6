"""Forecasting baselines: shapes, persistence, training on a toy batch, the shared ForecastTask machinery."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_cli import main
from lightning_modules.baselines import BaselineForecastModule
from lightning_modules.forecast_task import masked_pixel_loss
from metrics.functional import mse
from networks.baselines import Persistence, PredRNN, SimVP

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO_ROOT / "data" / "demo"
TINY_PREDRNN = REPO_ROOT / "configs" / "tiny" / "predrnn.yaml"


def tiny_simvp(in_frames: int = 2) -> SimVP:
    return SimVP(
        in_frames=in_frames,
        hidden_spatial=8,
        hidden_temporal=16,
        num_spatial_layers=2,
        num_temporal_blocks=2,
        kernel_size=7,
        mlp_ratio=2.0,
    )


def tiny_predrnn() -> PredRNN:
    return PredRNN(hidden_channels=8, num_layers=2, kernel_size=3, patch_size=4)


def toy_batch(batch: int = 2, history: int = 2, size: int = 16) -> dict:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(batch, history, 3, size, size, generator=generator)
    target = image[:, -1].roll(1, dims=-1)
    mask = torch.ones(batch, size, size, dtype=torch.bool)
    mask[:, :2] = False
    return {"image": image, "target": target, "mask": mask}


@pytest.mark.parametrize("network", [Persistence(), tiny_simvp(), tiny_predrnn()], ids=type)
def test_networks_map_history_to_next_frame(network):
    image = torch.rand(3, 2, 3, 16, 24)
    assert network(image).shape == (3, 3, 16, 24)


def test_persistence_is_the_last_frame():
    image = torch.rand(2, 3, 3, 8, 8)
    assert torch.equal(Persistence()(image), image[:, -1])
    assert not list(Persistence().parameters())


def test_simvp_rejects_wrong_history_and_size():
    with pytest.raises(ValueError, match="in_frames=2"):
        tiny_simvp()(torch.rand(1, 3, 3, 16, 16))
    with pytest.raises(ValueError, match="divisible by 2"):
        tiny_simvp()(torch.rand(1, 2, 3, 15, 16))


def test_predrnn_leaves_decoupling_loss_in_graph():
    network = tiny_predrnn()
    network(torch.rand(1, 2, 3, 16, 16))
    assert network.aux_loss.requires_grad and network.aux_loss.item() > 0


def tiny_predrnn_cli(root_dir: Path, *extra: str):
    """The tiny PredRNN config on the shipped demo data (real Sentinel-2 reflectance), as the CLI builds it."""
    args = ["--config", str(TINY_PREDRNN), "--data.init_args.root", str(DEMO_DATA)]
    args += ["--trainer.default_root_dir", str(root_dir), "--trainer.logger", "false"]
    return main([*args, "--trainer.enable_progress_bar", "false", *extra], run=False)


def test_predrnn_decoupling_term_stays_a_bounded_share_of_the_loss(tmp_path):
    """At reflectance scale (MSE ~1e-3) the paper's absolute 0.1 made the decoupling term ~95% of the loss."""
    cli = tiny_predrnn_cli(tmp_path)
    module, datamodule = cli.model, cli.datamodule
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(0)
    loss = module.training_step(batch, 0)
    decoupling = module.network.aux_loss
    pixel = module.pixel_loss(module.network(batch["image"]), batch["target"], batch["mask"])
    weight = 0.1  # decouple_weight of configs/tiny/predrnn.yaml
    assert decoupling.requires_grad and decoupling.item() > 0
    assert 1.0 - pixel.item() / loss.item() == pytest.approx(weight / (1.0 + weight), abs=1e-4)


def test_tiny_predrnn_fit_on_demo_data_keeps_spatial_detail(tmp_path):
    """One epoch of the tiny config: the forecast keeps the target's spatial contrast instead of going flat.

    Before the fix the config's Adam inherited AdamW's weight_decay 0.01 (an L2 gradient term far above the
    reflectance-scale MSE gradient) and the forecast's spatial std fell to ~1/10 of the target's within an epoch.
    """
    cli = tiny_predrnn_cli(tmp_path, "--trainer.max_epochs", "1")
    assert cli.model.configure_optimizers().param_groups[0]["weight_decay"] == 0.0
    cli.trainer.fit(cli.model, cli.datamodule)
    forecast_std, target_std = [], []
    with torch.no_grad():
        for batch in cli.datamodule.val_dataloader():
            forecast = cli.model.predict_next(batch["image"])
            forecast_std.append(forecast.flatten(2).std(dim=2).mean())
            target_std.append(batch["target"].flatten(2).std(dim=2).mean())
    ratio = (torch.stack(forecast_std).mean() / torch.stack(target_std).mean()).item()
    assert 1 / 3 < ratio < 3


def test_configured_optimizer_does_not_inherit_adamw_weight_decay(tmp_path):
    """A config naming Adam without weight_decay gets Adam's default 0, not AdamW's 0.01 (jsonargparse carry-over)."""
    config = yaml.safe_load(TINY_PREDRNN.read_text())
    config["model"]["init_args"]["optimizer"]["init_args"].pop("weight_decay", None)
    path = tmp_path / "predrnn.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["--config", str(path), "--data.init_args.root", str(DEMO_DATA), "--trainer.logger", "false"]
    optimizer = main(
        [*args, "--trainer.default_root_dir", str(tmp_path)], run=False
    ).model.configure_optimizers()
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["weight_decay"] == 0.0


def test_predrnn_supervises_every_next_frame():
    """With k = 3 the training loss is the MSE of all three step outputs against frames 2, 3 and the target."""
    torch.manual_seed(0)
    network = PredRNN(hidden_channels=8, num_layers=2, kernel_size=3, patch_size=4, decouple_weight=0.0)
    module = BaselineForecastModule(network, history=3, aux_weighting="absolute")
    batch = toy_batch(history=3)
    image, mask = batch["image"], batch["mask"]
    outputs = network.next_frames(image)
    assert outputs.shape == (2, 3, 3, 16, 16)
    assert torch.equal(outputs[:, -1], network(image))
    targets = torch.cat([image[:, 1:], batch["target"][:, None]], dim=1)
    per_step = [masked_pixel_loss(mse, outputs[:, t], targets[:, t], mask) for t in range(3)]
    assert module.training_step(batch, 0).item() == pytest.approx(
        torch.stack(per_step).mean().item(), rel=1e-5
    )


@pytest.mark.parametrize("make_network", [tiny_simvp, tiny_predrnn], ids=["SimVP", "PredRNN"])
def test_training_loss_decreases_on_toy_batch(make_network):
    torch.manual_seed(0)
    module = BaselineForecastModule(
        make_network(), optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), history=2
    )
    optimizer = module.configure_optimizers()
    batch = toy_batch()
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_persistence_module_optimises_nothing_under_manual_optimization():
    module = BaselineForecastModule(Persistence(), history=2)
    assert not module.automatic_optimization and module.configure_optimizers() == []
    assert not module.training_step(toy_batch(), 0).requires_grad  # logged only
    assert module.model_name() == "Persistence"


def test_history_mismatch_names_the_key():
    module = BaselineForecastModule(Persistence(), history=3)
    with pytest.raises(ValueError, match="`history`"):
        module.predict_next(toy_batch(history=2)["image"])


def test_masked_loss_ignores_invalid_pixels():
    forecast = torch.zeros(1, 3, 4, 4)
    target = torch.zeros(1, 3, 4, 4)
    forecast[..., 0, :] = 10.0
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[:, 0] = False
    assert masked_pixel_loss(mse, forecast, target, mask).item() == 0.0
    mask[:, 0, 0] = True
    assert masked_pixel_loss(mse, forecast, target, mask).item() == pytest.approx(100.0 / 13)
    nothing = torch.zeros(1, 4, 4, dtype=torch.bool)
    assert masked_pixel_loss(mse, forecast.requires_grad_(), target, nothing).requires_grad


def test_forecasts_are_clamped():
    module = BaselineForecastModule(Persistence(), history=1)
    image = torch.tensor([-1.0, 0.5, 2.0]).view(1, 1, 3, 1, 1)
    assert module.predict_next(image).flatten().tolist() == [0.0, 0.5, 1.0]
