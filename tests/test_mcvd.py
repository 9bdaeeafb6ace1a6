"""MCVD: conditioning masking, nodata-safe training loss, seeded DDPM/DDIM sampling, training, CLI runs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import rasterio
import torch

from datamodules.synthetic.s2 import make_s2_dataset
from lightning_cli import main
from lightning_modules import MCVDModule
from networks.baselines import MCVD

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO_ROOT / "data" / "demo"
TINY_CONFIG = REPO_ROOT / "configs" / "tiny" / "mcvd.yaml"


def tiny_mcvd(in_frames: int = 1, **overrides) -> MCVD:
    settings = dict(
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=4,
        sampler="ddim",
        sampling_steps=3,
    )
    settings.update(overrides)
    return MCVD(in_frames=in_frames, **settings)


def tiny_module(in_frames: int = 1, **overrides) -> MCVDModule:
    torch.manual_seed(0)
    return MCVDModule(tiny_mcvd(in_frames, **overrides), history=in_frames)


def toy_batch(batch: int = 3, history: int = 1, size: int = 8, named: bool = True) -> dict:
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(batch, history, 3, size, size, generator=generator)
    batch_dict = {
        "image": image,
        "target": image[:, -1].roll(1, dims=-1),
        "mask": torch.ones(batch, size, size, dtype=torch.bool),
    }
    if named:
        batch_dict |= {
            "region": [f"region{i}" for i in range(batch)],
            "transform": [(10.0, 0.0, 100.0 * i, 0.0, -10.0, 5000.0) for i in range(batch)],
            "target_time": ["2021"] * batch,
        }
    return batch_dict


def generators(count: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def conditioning_seen_by_unet(module: MCVDModule, batch: dict) -> torch.Tensor:
    """The conditioning channels the UNet received in one training draw."""
    seen = []
    handle = module.network.unet.register_forward_pre_hook(
        lambda _, args: seen.append(args[0][:, 3:].clone())
    )
    with torch.no_grad():
        module.denoising_loss(batch, module.training_generators(batch))
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("p_mask", [0.0, 0.5, 1.0])
def test_masking_zeroes_the_past_at_about_p_mask(p_mask):
    module = tiny_module(in_frames=2, p_mask=p_mask)
    batch = toy_batch(batch=200, history=2, size=4, named=False)
    condition = conditioning_seen_by_unet(module, batch)
    masked = (condition == 0).flatten(1).all(dim=1)
    assert masked.float().mean().item() == pytest.approx(p_mask, abs=0.12)
    expected = batch["image"].flatten(1, 2) * 2 - 1  # the unmasked past, scaled to [-1, 1]
    assert torch.equal(condition[~masked], expected[~masked])


def test_training_loss_ignores_invalid_pixels():
    module = tiny_module()
    batch = toy_batch()
    batch["mask"][:, :2] = False
    batch["image"][:, :, :, 0, 0] = 0.0  # what the datamodule gives for nodata
    reference = module.denoising_loss(batch, generators(3))
    batch["target"][:, :, :2] = float("nan")
    batch["image"][:, :, :, 0, 0] = float("nan")  # an invalid input pixel must not poison the UNet either
    loss = module.denoising_loss(batch, generators(3))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    batch["image"][:, :, :, 0, 0] = 0.0
    assert module.denoising_loss(batch, generators(3)).item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_sampling_gives_frames_that_do_not_depend_on_the_batch(sampler, eta):
    module = tiny_module(sampler=sampler, eta=eta).eval()
    batch = toy_batch()
    keys = [f"{region}|{i}" for i, region in enumerate(batch["region"])]
    forecast = module.predict_next(batch["image"], keys)
    assert forecast.shape == (3, 3, 8, 8) and forecast.min() >= 0 and forecast.max() <= 1
    alone = module.predict_next(batch["image"][1:2], keys[1:2])
    torch.testing.assert_close(alone, forecast[1:2], atol=1e-5, rtol=0)
    other_noise = module.predict_next(batch["image"][1:2], ["another window"])
    assert (other_noise - alone).abs().max() > 1e-3  # the seeded noise is used
    unnamed = module.predict_next(batch["image"], None)  # seeded by the input pixels instead
    torch.testing.assert_close(module.predict_next(batch["image"][2:], None), unnamed[2:], atol=1e-5, rtol=0)


def test_training_steps_reduce_the_denoising_loss_on_a_fixed_batch():
    module = tiny_module()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    batch = toy_batch(batch=4)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = module.denoising_loss(batch, generators(4))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_history_of_two_frames_trains_and_forecasts():
    module = tiny_module(in_frames=2)
    batch = toy_batch(history=2)
    assert module.network.unet.config.in_channels == 9
    module.denoising_loss(batch, generators(3)).backward()
    assert module.predict_next(batch["image"]).shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match="in_frames"):
        MCVDModule(tiny_mcvd(in_frames=2), history=1)


def cli_args(root_dir: Path, data_root: Path = DEMO_DATA) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--data.init_args.root", str(data_root), "--trainer.default_root_dir",
            str(root_dir), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]  # fmt: skip


def test_cli_fit_test_predict_and_rollout_of_the_tiny_config(tmp_path):
    args = cli_args(tmp_path)
    fit = main(["fit", *args, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                "--trainer.limit_val_batches", "1"])  # fmt: skip
    assert isinstance(fit.model, MCVDModule) and "val/gssim" in fit.trainer.callback_metrics
    checkpoint = ["--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt")]

    # the same four windows in one batch of 4 or two of 2: the seeded sampler gives the same scores
    for batch_size, batches in (("4", "1"), ("2", "2")):
        main(["test", *args, *checkpoint, "--data.init_args.batch_size", batch_size,
              "--trainer.limit_test_batches", batches])  # fmt: skip
    with (tmp_path / "test_results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model"] for row in rows] == ["MCVD", "MCVD"]
    assert float(rows[0]["l1"]) == pytest.approx(float(rows[1]["l1"]), rel=1e-4)

    main(["predict", *args, *checkpoint, "--trainer.limit_predict_batches", "1",
          "--data.init_args.predict_mode", "pairs"])  # fmt: skip
    outputs = sorted((tmp_path / "predictions").iterdir())
    assert len(outputs) == 4
    for path in outputs:
        with rasterio.open(path) as out:
            forecast = out.read()
        assert forecast.shape == (3, 64, 64) and forecast.min() >= 0 and forecast.max() <= 1

    data = make_s2_dataset(tmp_path / "seq", years=(2019, 2020, 2021), embeddings=False, height=64, width=64)
    rollout = main(["test", *cli_args(tmp_path / "rollout", data), *checkpoint, "--data.init_args.sequence",
                    "true", "--data.init_args.batch_size", "1", "--data.init_args.time_regex", r"\d{4}"])  # fmt: skip
    assert {"test/step_1/l1", "test/step_2/l1", "test/step_2/ssim"} <= set(rollout.trainer.callback_metrics)
    assert list((tmp_path / "rollout" / "rollouts").glob("MCVD_*.png"))
