"""Atomic, lean checkpoints and exact resume (in-process mid-epoch, and SIGKILL / SIGTERM with subprocesses, with loader
workers and random augmentation); nothing lost at epoch and run ends; corrupt files named."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import callbacks.checkpoint as checkpoint_module
from callbacks import AtomicCheckpointIO, CorruptCheckpointError, ExactResume, LastCheckpoint, TrainableEMA
from lightning_cli import main
from tests.conftest import REPO_ROOT
from tests.fixtures.toy_training import ToyData, ToyRegression

TOY = "tests.fixtures.toy_training"


def _trainer(root, callbacks, **kwargs):
    return Trainer(
        default_root_dir=root,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    torch.testing.assert_close(a["state_dict"], b["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(a["ema"], b["ema"], rtol=0, atol=0)
    torch.testing.assert_close(a["optimizer_states"], b["optimizer_states"], rtol=0, atol=0)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(100)}, target)

    def crash_mid_write(obj, stream, *args, **kwargs):
        stream.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(100)}, target)
    monkeypatch.undo()
    assert torch.load(target)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "temp file left behind"


def test_stale_temp_files_are_removed_and_the_mode_follows_the_umask(tmp_path):
    stale = tmp_path / ".last.ckpt.k1ll3d.tmp"  # left by a write that was killed with SIGKILL
    stale.write_bytes(b"half a checkpoint")
    previous = os.umask(0o002)  # a shared cluster folder: group members may read and write
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o664


@pytest.mark.parametrize("damage", ["truncated", "zero-filled"])
def test_corrupt_checkpoint_is_named_without_suggesting_an_unsafe_load(tmp_path, damage):
    path = tmp_path / "last.ckpt"
    trainer = _trainer(tmp_path, [], max_steps=1, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(ToyRegression(), datamodule=ToyData())
    trainer.save_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(len(data)))
    trainer = _trainer(tmp_path, [], max_steps=2, enable_checkpointing=False, num_sanity_val_steps=0)
    with pytest.raises(CorruptCheckpointError) as failure:
        trainer.fit(ToyRegression(), datamodule=ToyData(), ckpt_path=str(path))
    message = str(failure.value)
    assert str(path) in message and "corrupt" in message
    assert "weights_only" not in message


def test_checkpoint_size_tracks_trainable_parameters(tmp_path):
    model = ToyRegression(frozen_width=4096)
    trainer = _trainer(tmp_path, [], max_steps=2, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=ToyData())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    overhead = 24 * 1024  # pickle framing, loop state, hyper-parameters
    assert frozen > 50 * trainable
    assert (tmp_path / "weights.ckpt").stat().st_size < trainable + overhead
    assert (tmp_path / "full.ckpt").stat().st_size < 3 * trainable + overhead  # weights + AdamW moments


def test_in_process_mid_epoch_resume_is_exact(tmp_path):
    def run(root, max_steps=-1, ckpt_path=None):
        torch.manual_seed(0)
        callbacks = [TrainableEMA(decay=0.9), ExactResume(seed=0), LastCheckpoint(every_n_train_steps=7)]
        trainer = _trainer(root, callbacks, max_epochs=2, max_steps=max_steps, num_sanity_val_steps=0)
        trainer.fit(ToyRegression(), datamodule=ToyData(), ckpt_path=ckpt_path)
        return torch.load(Path(root) / "checkpoints" / "last.ckpt", weights_only=False)

    reference = run(tmp_path / "reference")
    interrupted = run(tmp_path / "resumed", max_steps=7)  # stops mid-epoch 0 right after the step-7 save
    assert interrupted["global_step"] == 7
    torch.manual_seed(123)  # the resumed run must not depend on the process's RNG state
    resumed = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "resumed" / "checkpoints" / "last.ckpt"))
    _assert_same_training_state(reference, resumed)


def test_in_process_resume_with_workers_and_random_augmentation_is_exact(tmp_path):
    # Two persistent workers whose samples draw jitter from the global RNG: the worker that serves a batch shifts when
    # the resumed epoch skips its done batches, and worker seeds are redrawn at every restart.
    def run(root, max_steps=-1, ckpt_path=None):
        callbacks = [TrainableEMA(decay=0.9), ExactResume(seed=0), LastCheckpoint(every_n_train_steps=7)]
        trainer = _trainer(root, callbacks, max_epochs=2, max_steps=max_steps, num_sanity_val_steps=0)
        data = ToyData(augment_std=0.1, num_workers=2, persistent_workers=True)
        torch.manual_seed(0)
        trainer.fit(ToyRegression(), datamodule=data, ckpt_path=ckpt_path)
        return torch.load(Path(root) / "checkpoints" / "last.ckpt", weights_only=False)

    reference = run(tmp_path / "reference")
    assert run(tmp_path / "resumed", max_steps=7)["global_step"] == 7
    resumed = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "resumed" / "checkpoints" / "last.ckpt"))
    _assert_same_training_state(reference, resumed)


class _ValidatedEpochs(Callback):
    def __init__(self):
        self.epochs: list[int] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.epochs.append(trainer.current_epoch)


class _Killed(Exception):
    pass


class _KilledInFirstValidation(Callback):
    """Stands for a SIGKILL that lands while epoch 0 validates, after its last training batch."""

    def on_validation_start(self, trainer, pl_module):
        if trainer.current_epoch == 0 and not trainer.sanity_checking:
            raise _Killed


def test_restart_after_the_last_batch_of_an_epoch_still_validates_it(tmp_path):
    # The periodic save falls on the epoch's last batch (10 batches per epoch): a restart from it must not treat the
    # epoch as done, or its validation, epoch-end hooks and best-model score are lost.
    def run(root, extra=(), ckpt_path=None):
        validated = _ValidatedEpochs()
        best = ModelCheckpoint(monitor="val/loss", filename="best-{epoch}")
        callbacks = [validated, *extra, ExactResume(seed=0), LastCheckpoint(every_n_train_steps=5), best]
        trainer = _trainer(root, callbacks, max_epochs=2, num_sanity_val_steps=0)
        torch.manual_seed(0)
        trainer.fit(ToyRegression(), datamodule=ToyData(), ckpt_path=ckpt_path)
        return validated.epochs, best

    reference_epochs, reference_best = run(tmp_path / "reference")
    assert reference_epochs == [0, 1]
    with pytest.raises(_Killed):
        run(tmp_path / "resumed", extra=[_KilledInFirstValidation()])
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    epochs, best = run(tmp_path / "resumed", ckpt_path=str(last))
    assert epochs == [0, 1], "a restarted epoch skipped its validation"
    assert best.best_model_score == reference_best.best_model_score
    torch.testing.assert_close(
        torch.load(last, weights_only=False)["state_dict"],
        torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"],
        rtol=0,
        atol=0,
    )


class _StepsScheduledToy(ToyRegression):
    """LR decaying over ``trainer.estimated_stepping_batches`` (as ForecastModule's warm-up/cosine): reading it in
    ``configure_optimizers`` sets up the train loader, and starts its workers, before Lightning restores the loops."""

    def configure_optimizers(self):
        optimizer = self.optimizer(self.head.parameters(), lr=self.hparams.lr)
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / (total + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _KilledAfterStep(Callback):
    """Stands for a SIGKILL right after the checkpoint of optimizer step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise _Killed


@pytest.mark.parametrize("killed_after", [10, 13], ids=["epoch-end checkpoint", "mid-epoch-1 checkpoint"])
def test_resume_in_a_later_epoch_with_workers_and_a_steps_schedule_is_exact(tmp_path, killed_after):
    # 10 batches per epoch; the loader's workers draw their first indices as soon as its iterator exists. The resumed
    # epoch 1 must get epoch 1's order and jitter (and skip its done batches), not epoch 0's.
    def run(root, extra=(), ckpt_path=None):
        callbacks = [
            *extra,
            TrainableEMA(decay=0.9),
            ExactResume(seed=0),
            LastCheckpoint(every_n_train_steps=13),
        ]
        trainer = _trainer(root, callbacks, max_epochs=2, num_sanity_val_steps=0)
        torch.manual_seed(0)
        data = ToyData(augment_std=0.1, num_workers=2)
        trainer.fit(_StepsScheduledToy(), datamodule=data, ckpt_path=ckpt_path)
        return torch.load(Path(root) / "checkpoints" / "last.ckpt", weights_only=False)

    reference = run(tmp_path / "reference")
    with pytest.raises(_Killed):
        run(tmp_path / "resumed", extra=[_KilledAfterStep(killed_after)])
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == killed_after
    _assert_same_training_state(reference, run(tmp_path / "resumed", ckpt_path=str(last)))


class _RawWeights(Callback):
    """The trainable weights after each optimizer step (before the EMA callback swaps anything)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.last = {k: v.detach().clone() for k, v in pl_module.head.state_dict().items()}


@pytest.mark.parametrize("every_n_train_steps", [0, 5])
def test_run_ending_mid_epoch_saves_its_last_step_with_raw_and_ema_weights(tmp_path, every_n_train_steps):
    raw = _RawWeights()
    callbacks = [raw, TrainableEMA(decay=0.8), LastCheckpoint(every_n_train_steps=every_n_train_steps)]
    trainer = _trainer(tmp_path, callbacks, max_steps=7, num_sanity_val_steps=0)  # 10 batches per epoch
    trainer.fit(ToyRegression(), datamodule=ToyData())
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 7
    for name, value in raw.last.items():  # the raw weights, not the EMA a second time
        torch.testing.assert_close(checkpoint["ema"]["weights"][f"head.{name}"], value, rtol=0, atol=0)
    assert not torch.equal(checkpoint["state_dict"]["head.0.weight"], raw.last["0.weight"])


def test_last_checkpoint_from_the_config_records_the_current_best_model(tmp_path):
    config = {
        "model": {"class_path": f"{TOY}.ToyRegression"},
        "data": {"class_path": f"{TOY}.ToyData", "init_args": {"num_train": 8}},
        "trainer": {
            "max_epochs": 3,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "callbacks.LastCheckpoint", "init_args": {"every_n_train_steps": 3}}
            ],
        },
    }
    config_path = tmp_path / "toy.yaml"
    config_path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(config_path), "--trainer.default_root_dir", str(tmp_path)])
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    (best,) = [state for key, state in checkpoint["callbacks"].items() if "val/loss" in key]
    assert Path(best["best_model_path"]).is_file(), (
        f"last.ckpt names a deleted best model {best['best_model_path']}"
    )


def _wait_for_checkpoint(path: Path, process: subprocess.Popen, min_step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        if path.exists() and torch.load(path, weights_only=False)["global_step"] >= min_step:
            return
        time.sleep(0.2)
    process.kill()
    raise TimeoutError(f"no checkpoint at step >= {min_step} in {path}")


@pytest.mark.slow  # ~95 s of subprocesses; the in-process kill cases above and test_kill_loops.py cover it
def test_sigkill_and_sigterm_then_resume_match_uninterrupted_run(tmp_path):
    config = {
        "seed_everything": 0,
        "model": {"class_path": f"{TOY}.ToyRegression", "init_args": {"step_sleep": 0.25}},
        "data": {
            "class_path": f"{TOY}.ToyData",
            "init_args": {"augment_std": 0.1, "num_workers": 2, "persistent_workers": True},
        },
        "trainer": {
            "accelerator": "cpu",
            "deterministic": True,
            "max_epochs": 2,
            "logger": False,
            "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "callbacks.TrainableEMA", "init_args": {"decay": 0.9}},
                {"class_path": "callbacks.LastCheckpoint", "init_args": {"every_n_train_steps": 3}},
            ],
        },
    }
    config_path = tmp_path / "toy.yaml"
    config_path.write_text(yaml.safe_dump(config))

    main(["fit", "--config", str(config_path), "--trainer.default_root_dir", str(tmp_path / "reference")])
    reference = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=False)

    run_dir = tmp_path / "interrupted"
    last = run_dir / "checkpoints" / "last.ckpt"
    command = [sys.executable, "-m", "lightning_cli", "fit", "--config", str(config_path)]
    command += ["--trainer.default_root_dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}

    def start(*extra):
        return subprocess.Popen(
            [*command, *extra],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    first = start()
    _wait_for_checkpoint(last, first, min_step=3)  # mid-epoch 0 (10 batches per epoch)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = torch.load(last, weights_only=False)["global_step"]
    assert 3 <= killed_at < 10

    second = start("--ckpt_path", "last")
    _wait_for_checkpoint(last, second, min_step=killed_at + 2)
    second.send_signal(signal.SIGTERM)
    output = second.communicate(timeout=120)[0]
    assert second.returncode == 0, output[-3000:]
    preempted = torch.load(last, weights_only=False)
    assert preempted["global_step"] < reference["global_step"], "SIGTERM came after the end of training"

    third = start("--ckpt_path", "last")
    output = third.communicate(timeout=300)[0]
    assert third.returncode == 0, output[-3000:]
    _assert_same_training_state(reference, torch.load(last, weights_only=False))

    # test --ckpt_path rebuilds the model from config + checkpoint alone and evaluates the EMA weights.
    cli = main(
        [
            "test",
            "--config",
            str(config_path),
            "--ckpt_path",
            str(last),
            "--trainer.default_root_dir",
            str(run_dir),
        ]
    )
    model = cli.model
    for name, value in model.head.state_dict().items():
        torch.testing.assert_close(value, reference["state_dict"][f"head.{name}"], rtol=0, atol=0)
    data = ToyData()
    data.setup("test")
    x, y = data.val_set.tensors
    expected = torch.nn.functional.mse_loss(model.eval()(x), y)
    torch.testing.assert_close(cli.trainer.callback_metrics["test/loss"], expected, rtol=1e-5, atol=1e-6)
