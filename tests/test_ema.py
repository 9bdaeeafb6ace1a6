"""TrainableEMA: averages only trainable weights, follows the EMA formula, is swapped in and checkpointed once; is
built after ``configure_model`` on the device the parameters train on."""

import torch
from lightning.pytorch import Callback, Trainer

from callbacks import LastCheckpoint, TrainableEMA
from tests.fixtures.toy_training import ToyData, ToyLazyHead, ToyRegression


class WeightRecorder(Callback):
    """Records the trainable weights after every optimizer step (placed before the EMA callback)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.head.state_dict().items()})


def _fit(tmp_path, ema, max_epochs=1, callbacks_extra=(), **trainer_kwargs):
    recorder = WeightRecorder()
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        callbacks=[recorder, ema, *callbacks_extra],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    torch.manual_seed(0)  # the frozen random backbone, rebuilt the same by a reload
    model = ToyRegression(dropout=0.0, noise_std=0.0)
    trainer.fit(model, datamodule=ToyData(num_train=24))
    return trainer, model, recorder


def test_average_holds_trainable_parameters_only(tmp_path):
    ema = TrainableEMA(decay=0.9)
    trainer, model, _ = _fit(tmp_path, ema, max_steps=2)
    head_names = [f"head.{name}" for name, _ in model.head.named_parameters()]
    assert ema._average_model.names == head_names
    averaged = sum(p.numel() for p in ema._average_model.parameters())
    assert averaged == sum(p.numel() for p in model.head.parameters())


def test_ema_formula_and_start_step(tmp_path):
    decay, start_step = 0.5, 2
    ema = TrainableEMA(decay=decay, start_step=start_step)
    trainer, model, recorder = _fit(tmp_path, ema, enable_checkpointing=False)
    expected = None
    for step, weights in enumerate(recorder.steps, start=1):
        if step <= start_step or expected is None:
            expected = weights
        else:
            expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in weights}
    # After fit, on_train_end copies the average into the module.
    for name, value in model.head.state_dict().items():
        torch.testing.assert_close(value, expected[name])
    assert not torch.equal(model.head.state_dict()["0.weight"], recorder.steps[-1]["0.weight"])


def test_checkpoint_holds_ema_as_state_dict_and_raw_weights_once(tmp_path):
    ema = TrainableEMA(decay=0.8)
    trainer, model, recorder = _fit(
        tmp_path, ema, max_steps=3, callbacks_extra=[LastCheckpoint(every_n_train_steps=3)]
    )
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    state = checkpoint["state_dict"]
    assert checkpoint["global_step"] == 3
    assert not any(key.startswith("backbone.") for key in state), "frozen part written into the checkpoint"
    assert set(checkpoint["ema"]["weights"]) == {f"head.{n}" for n, _ in model.head.named_parameters()}
    for name, value in model.head.state_dict().items():  # after fit the module holds the EMA
        torch.testing.assert_close(state[f"head.{name}"], value)
    for name, value in recorder.steps[-1].items():
        torch.testing.assert_close(checkpoint["ema"]["weights"][f"head.{name}"], value)
    assert not torch.equal(state["head.0.weight"], checkpoint["ema"]["weights"]["head.0.weight"])

    torch.manual_seed(0)
    reloaded = ToyRegression.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(
        reloaded.head.state_dict(), model.head.state_dict()
    )  # test/predict see the EMA


def test_validation_runs_on_ema_weights(tmp_path):
    seen = {}

    class ValWeights(Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            seen["module"] = pl_module.head[0].weight.detach().clone()
            seen["held"] = ema._average_model.averaged()[0].detach().clone()

    ema = TrainableEMA(decay=0.9)
    trainer, model, recorder = _fit(tmp_path, ema, callbacks_extra=[ValWeights()], enable_checkpointing=False)
    torch.testing.assert_close(seen["held"], recorder.steps[-1]["0.weight"])  # raw weights put aside
    torch.testing.assert_close(seen["module"], model.head[0].weight.detach())  # validation saw the EMA
    assert not torch.equal(seen["module"], seen["held"])


def test_head_created_in_configure_model_is_averaged(tmp_path):
    # Like DiFuserModule, whose head is built in configure_model, after the callbacks' setup.
    ema = TrainableEMA(decay=0.9)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=3,
        callbacks=[ema, LastCheckpoint(every_n_train_steps=3)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = ToyLazyHead(dropout=0.0, noise_std=0.0)
    trainer.fit(model, datamodule=ToyData())
    assert ema._average_model.names == [f"head.{name}" for name, _ in model.head.named_parameters()]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert set(checkpoint["ema"]["weights"]) == set(ema._average_model.names)


def test_average_lives_on_the_device_the_parameters_train_on():
    # Callbacks' setup runs before the strategy moves the model (to the GPU); the average must follow the move.
    # The "meta" device stands in for a GPU: the model is moved after setup, as Lightning's strategy does.
    model = ToyRegression()
    ema = TrainableEMA(decay=0.9)
    ema.setup(None, model, "fit")
    model.to("meta")
    ema.on_fit_start(None, model)
    assert {p.device.type for p in ema._average_model.parameters()} == {"meta"}
