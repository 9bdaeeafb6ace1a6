"""LightningCLI for every satdiff model and datamodule.

Models and datamodules are chosen by ``class_path`` (short class names work because the packages
below are imported before parsing), every constructor argument is a config key, and unknown keys
are rejected by jsonargparse with the offending key named.
"""

from __future__ import annotations

import os

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import callbacks  # noqa: F401  (registers short class names)
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401
import metrics  # noqa: F401
import networks  # noqa: F401
from callbacks import ExactResume, LastCheckpoint, NonFiniteLossGuard

DEFAULT_RUN_DIR = "runs"


def trainer_defaults() -> dict:
    """Defaults a user gets without configuring anything.

    Offline W&B and atomic checkpoint writes. The callbacks are LightningCLI's persistent callbacks (added to
    whatever ``trainer.callbacks`` a config sets): the best checkpoint by ``val/loss``; ``last.ckpt`` every 500
    steps, per epoch and on SIGTERM (a ``LastCheckpoint`` in the config replaces this one); exact resume (RNG
    states, mid-epoch data order); a stop on a non-finite loss.
    """
    return {
        "default_root_dir": DEFAULT_RUN_DIR,
        "logger": {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"project": "satdiff", "offline": True, "save_dir": DEFAULT_RUN_DIR},
        },
        "plugins": [{"class_path": "callbacks.AtomicCheckpointIO"}],
        "callbacks": [
            ModelCheckpoint(monitor="val/loss", mode="min", filename="best-{epoch}-{step}"),
            LastCheckpoint(every_n_train_steps=500, overridable=True),
            ExactResume(),
            NonFiniteLossGuard(),
        ],
    }


class SatDiffCLI(LightningCLI):
    """LightningCLI with satdiff's defaults (seed 0, config saved next to the run)."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        os.environ.setdefault("WANDB_MODE", "offline")
        kwargs.setdefault("trainer_defaults", trainer_defaults())
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            args=args,
            run=run,
            **kwargs,
        )


def main(args: list[str] | None = None, run: bool = True) -> SatDiffCLI:
    """Run the CLI; tests call ``main([...])`` with an argument list."""
    return SatDiffCLI(args=args, run=run)
