"""A batch from a dataset without embedding files has no ``embedding`` key; the Sat-JEPA-Diff module copes, and
the loader's per-patch pooled embedding gives it the same targets as per-pixel embeddings."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from datamodules.s2_timeseries import S2ForecastDataModule, collate_s2
from datamodules.synthetic.s2 import DN_SCALE, embedding_path, make_s2_dataset, region_transform, write_raster
from lightning_cli import main
from networks.ijepa import patch_token_validity

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def run_from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)


def test_forecast_module_trains_on_batches_without_embedding():
    cli = main(
        ["--config", str(REPO_ROOT / "configs" / "tiny" / "forecast.yaml"), "--trainer.logger=false"],
        run=False,
    )
    module = cli.model
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 3, 64, 64, generator=generator)
    batch = {
        "image": image,
        "target": (image[:, -1] * 0.9 + 0.05).clamp(0, 1),
        "mask": torch.ones(2, 64, 64, dtype=torch.bool),
        "has_embedding": torch.tensor([False, False]),
    }
    with_zeros = {**batch, "embedding": torch.zeros(2, 64, 64, 64)}
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        for candidate in (batch, with_zeros):
            torch.manual_seed(0)
            losses.append(module.training_step(candidate, 0))
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[0], losses[1])


def test_loader_pooled_embedding_gives_the_model_the_same_targets_and_validity(tmp_path):
    """``embedding_patch_size: 8`` (the encoder's patch) leaves the model's targets and token validity as with
    per-pixel embeddings, a patch holding a NaN embedding pixel included; a pooling the encoder's patch size is
    not a multiple of fails naming the key."""
    regions = ("alps", "coast", "delta")
    data = make_s2_dataset(tmp_path / "data", regions=regions, height=72, width=80)
    for index, region in enumerate(regions):
        path = embedding_path(data, region, 2021)
        with rasterio.open(path) as src:
            embedding = src.read()
        embedding[:, 20, 30] = np.nan  # in every 64 px window of the 72 x 80 px tile
        write_raster(path, embedding, region_transform(index))
    module = main(
        ["--config", str(REPO_ROOT / "configs" / "tiny" / "forecast.yaml"), "--trainer.logger=false"],
        run=False,
    ).model
    batches = {}
    for pool in (1, 8):
        dm = S2ForecastDataModule(
            str(data),
            reflectance_scale=DN_SCALE,
            patch_size=64,
            batch_size=2,
            val_fraction=0.4,
            test_fraction=0.3,
            embedding_patch_size=pool,
            cache_dir=str(tmp_path / f"cache{pool}"),
        )
        dm.setup("fit")
        samples = [dm.val_dataset[i] for i in range(len(dm.val_dataset))]
        batches[pool] = collate_s2(samples)
    per_pixel, pooled = batches[1], batches[8]
    assert pooled["embedding"].shape[-2:] == (8, 8) and per_pixel["transform"] == pooled["transform"]
    like = torch.zeros(len(pooled["region"]), 64, 64)
    torch.testing.assert_close(
        module.embedding_tokens(pooled, like), module.embedding_tokens(per_pixel, like), atol=1e-5, rtol=1e-4
    )
    validity = patch_token_validity(pooled["mask"], module.patch_size)
    assert torch.equal(validity, patch_token_validity(per_pixel["mask"], module.patch_size))
    assert (~validity).sum() == 4  # the NaN pixel's patch in each of the 4 windows of the 2021 pair
    with pytest.raises(ValueError, match="data.init_args.embedding_patch_size=16"):
        module.embedding_tokens({**pooled, "embedding": torch.zeros(len(like), 64, 4, 4)}, like)
