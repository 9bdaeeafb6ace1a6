"""A batch from a dataset without embedding files has no ``embedding`` key; the Sat-JEPA-Diff module copes."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lightning_cli import main

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
