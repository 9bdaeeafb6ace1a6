"""Shared test set-up: offline, quiet, single-threaded torch so parallel suites stay fast on 2 cores."""

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real Sentinel-2 samples beside the checkout (../shared/data); tests skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def cli_sees_no_pytest_arguments(monkeypatch):
    """``main([...])`` passes its own arguments; LightningCLI warns when ``sys.argv`` holds pytest's as well."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
