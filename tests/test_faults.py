"""Faults: a NaN loss stops the run and keeps the last good checkpoint; bad config keys are named."""

import pytest
import torch
from lightning.pytorch import Trainer

from callbacks import AtomicCheckpointIO, LastCheckpoint, NonFiniteLossError, NonFiniteLossGuard
from lightning_cli import main
from tests.fixtures.toy_training import ToyData, ToyRegression

TOY = "tests.fixtures.toy_training"


def test_nan_loss_stops_before_the_step_and_keeps_last_good_checkpoint(tmp_path):
    model = ToyRegression(nan_at_step=5)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        callbacks=[NonFiniteLossGuard(), LastCheckpoint(every_n_train_steps=2)],
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    with pytest.raises(NonFiniteLossError, match=r"global step 5.*last\.ckpt"):
        trainer.fit(model, datamodule=ToyData())
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the NaN step reached the weights"
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_unknown_config_key_is_named(tmp_path, capsys):
    args = ["fit", "--model", f"{TOY}.ToyRegression", "--data", f"{TOY}.ToyData"]
    with pytest.raises(SystemExit):
        main([*args, "--model.init_args.hiden", "4", "--trainer.default_root_dir", str(tmp_path)])
    assert "hiden" in capsys.readouterr().err
