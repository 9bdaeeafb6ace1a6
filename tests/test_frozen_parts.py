"""A checkpoint names the frozen parts it was trained with: loading it with another frozen backbone is refused."""

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_modules.frozen import ALLOW_MISMATCH_VARIABLE, FrozenPartMismatchError
from tests.fixtures.toy_training import ToyData, ToyRegression


@pytest.fixture()
def checkpoint_path(tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(ToyRegression(), datamodule=ToyData())
    path = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_same_frozen_backbone_loads(checkpoint_path):
    torch.manual_seed(0)  # rebuilds the same frozen random projection
    ToyRegression.load_from_checkpoint(checkpoint_path)


def test_other_frozen_backbone_with_the_same_shapes_is_refused(checkpoint_path, monkeypatch):
    torch.manual_seed(1)  # same architecture, other frozen weights (as another pretrained folder would give)
    with pytest.raises(FrozenPartMismatchError, match=r"frozen part 'backbone' .*\(weights\)"):
        ToyRegression.load_from_checkpoint(checkpoint_path)
    monkeypatch.setenv(ALLOW_MISMATCH_VARIABLE, "1")
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="frozen part 'backbone'"):
        ToyRegression.load_from_checkpoint(checkpoint_path)


def test_other_frozen_architecture_is_refused(checkpoint_path):
    torch.manual_seed(0)
    model = ToyRegression()
    model.backbone[1] = torch.nn.Sigmoid()  # same tensors, other frozen computation
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    with pytest.raises(FrozenPartMismatchError, match=r"'backbone' .*\(config\)"):
        model.on_load_checkpoint(checkpoint)
