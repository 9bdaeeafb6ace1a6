"""Faults: a NaN loss or gradient stops the run and keeps the last good checkpoints; bad config keys are named;
SIGTERM / SIGINT, single-process and under DDP (to the process group or to one rank), save once and exit 0."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import (
    AtomicCheckpointIO,
    ExactResume,
    LastCheckpoint,
    NonFiniteLossError,
    NonFiniteLossGuard,
    TrainableEMA,
)
from lightning_cli import main
from tests.conftest import REPO_ROOT
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


def test_nan_gradient_with_finite_loss_on_the_last_batch_is_never_applied_nor_saved(tmp_path):
    # Step 10 is epoch 0's last batch: its loss is finite but its gradients are NaN.
    model = ToyRegression(nan_grad_at_step=9)
    ema = TrainableEMA(decay=0.9)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        callbacks=[NonFiniteLossGuard(), ema, LastCheckpoint(every_n_train_steps=3)],
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient.*global step 9.*last\.ckpt"):
        trainer.fit(model, datamodule=ToyData())
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the NaN step reached the weights"
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 9
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    assert all(torch.isfinite(v).all() for v in checkpoint["ema"]["weights"].values())


def test_a_checkpoint_with_non_finite_weights_is_refused_and_the_good_one_kept(tmp_path):
    model = ToyRegression()
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        callbacks=[NonFiniteLossGuard()],
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=ToyData())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    with torch.no_grad():
        model.head[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"head\.0\.weight"):
        trainer.save_checkpoint(path)
    assert all(torch.isfinite(v).all() for v in torch.load(path, weights_only=False)["state_dict"].values())


def _pre_emptible_fit(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """``fit`` of the slow toy model in its own process group (like a SLURM step), saving every 2 steps."""
    config = tmp_path / "toy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"class_path": f"{TOY}.ToyRegression", "init_args": {"step_sleep": 0.2}},
                "data": {"class_path": f"{TOY}.ToyData"},
                "trainer": {
                    "accelerator": "cpu",
                    "max_epochs": 50,
                    "logger": False,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "callbacks": [
                        {"class_path": "callbacks.LastCheckpoint", "init_args": {"every_n_train_steps": 2}}
                    ],
                },
            }
        )
    )
    command = [sys.executable, "-m", "lightning_cli", "fit", "--config", str(config), *extra]
    command += ["--trainer.default_root_dir", str(tmp_path / "run")]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return process, tmp_path / "run" / "checkpoints" / "last.ckpt"


def _wait_for_step(path: Path, process: subprocess.Popen, min_step: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        if path.exists():
            step = torch.load(path, weights_only=False)["global_step"]
            if step >= min_step:
                return step
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    raise TimeoutError(f"no checkpoint at step >= {min_step} in {path}")


def _finish(process: subprocess.Popen, timeout: float = 90) -> str:
    """The output once every process of the group has exited; fails (and kills the group) on a hang."""
    try:
        output = process.communicate(timeout=timeout)[0]
        deadline = time.monotonic() + 30
        while any(p.info["pid"] for p in psutil.process_iter(["pid"]) if _in_group(p, process.pid)):
            assert time.monotonic() < deadline, "a rank is still running after rank 0 exited"
            time.sleep(0.2)
        return output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"the run hung after the signal:\n{process.communicate()[0][-3000:]}") from None


def _in_group(process: psutil.Process, group: int) -> bool:
    try:
        return os.getpgid(process.pid) == group
    except (ProcessLookupError, PermissionError):
        return False


def _assert_stopped_cleanly(process: subprocess.Popen, output: str, last: Path, signalled_after: int) -> None:
    assert process.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert output.count("stopping; resume with") == 1, output[-3000:]
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] > signalled_after, "the work since the last periodic save was lost"
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_sigint_saves_and_exits_like_sigterm(tmp_path):
    process, last = _pre_emptible_fit(tmp_path)
    step = _wait_for_step(last, process, min_step=3)
    time.sleep(0.3)  # mid-way between two periodic saves
    process.send_signal(signal.SIGINT)
    _assert_stopped_cleanly(process, _finish(process), last, step)


@pytest.mark.parametrize("target", ["process group", pytest.param("one rank", marks=pytest.mark.slow)])
def test_sigterm_under_ddp_saves_once_and_every_rank_exits_0(tmp_path, target):
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    process, last = _pre_emptible_fit(tmp_path, *ddp)
    step = _wait_for_step(last, process, min_step=3)
    time.sleep(0.3)
    if target == "process group":  # SLURM's scancel / pre-emption and torchrun signal every rank
        os.killpg(process.pid, signal.SIGTERM)
    else:  # only rank 1 (the process Lightning launched): the ranks must still agree to stop
        (rank1,) = psutil.Process(process.pid).children()
        rank1.send_signal(signal.SIGTERM)
    _assert_stopped_cleanly(process, _finish(process), last, step)


class _SigtermAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class _ValidationBatches(Callback):
    def __init__(self):
        self.seen: list[tuple[int, int]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen.append((trainer.current_epoch, batch_idx))


def test_sigterm_on_an_epochs_last_batch_stops_after_its_validation_and_resumes_exactly(tmp_path):
    # Step 10 is epoch 0's last batch: the stop waits for its validation (2 batches) and epoch end, so the restart
    # neither skips them nor loses the epoch's best-model score.
    def run(root, validated, extra=(), ckpt_path=None):
        best = ModelCheckpoint(monitor="val/loss", filename="best-{epoch}")
        callbacks = [*extra, validated, ExactResume(seed=0), LastCheckpoint(every_n_train_steps=3), best]
        trainer = Trainer(
            default_root_dir=root,
            max_epochs=2,
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
            logger=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
        )
        torch.manual_seed(0)
        trainer.fit(ToyRegression(), datamodule=ToyData(), ckpt_path=ckpt_path)
        return best.best_model_score, root / "checkpoints" / "last.ckpt"

    reference_seen = _ValidationBatches()
    reference_best, reference_last = run(tmp_path / "reference", reference_seen)
    assert reference_seen.seen == [(0, 0), (0, 1), (1, 0), (1, 1)]
    interrupted_seen = _ValidationBatches()
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path / "resumed", interrupted_seen, extra=[_SigtermAtStep(10)])
    assert stopped.value.code in (None, 0)
    assert interrupted_seen.seen == [(0, 0), (0, 1)], "the stop did not wait for epoch 0's validation"
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 10
    resumed_seen = _ValidationBatches()
    best, _ = run(tmp_path / "resumed", resumed_seen, ckpt_path=str(last))
    assert resumed_seen.seen == [(1, 0), (1, 1)], "epoch 0's validation was repeated or epoch 1's skipped"
    assert best == reference_best
    torch.testing.assert_close(
        torch.load(last, weights_only=False)["state_dict"],
        torch.load(reference_last, weights_only=False)["state_dict"],
        rtol=0,
        atol=0,
    )
