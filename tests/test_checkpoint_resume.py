"""Atomic, lean checkpoints and exact resume (in-process mid-epoch, and SIGKILL / SIGTERM with subprocesses)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

import callbacks.checkpoint as checkpoint_module
from callbacks import AtomicCheckpointIO, ExactResume, LastCheckpoint, TrainableEMA
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


def _wait_for_checkpoint(path: Path, process: subprocess.Popen, min_step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        if path.exists() and torch.load(path, weights_only=False)["global_step"] >= min_step:
            return
        time.sleep(0.2)
    process.kill()
    raise TimeoutError(f"no checkpoint at step >= {min_step} in {path}")


def test_sigkill_and_sigterm_then_resume_match_uninterrupted_run(tmp_path):
    config = {
        "seed_everything": 0,
        "model": {"class_path": f"{TOY}.ToyRegression", "init_args": {"step_sleep": 0.25}},
        "data": {"class_path": f"{TOY}.ToyData"},
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
