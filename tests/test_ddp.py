"""DDP on CPU (gloo): a 2-process run matches a 1-process run with the same global batch."""

import os
import subprocess
import sys

import torch

from lightning_cli import main
from tests.conftest import REPO_ROOT

TOY = "tests.fixtures.toy_training"


def test_two_process_ddp_matches_single_process(tmp_path):
    # No dropout/noise and an ordered loader: rank r takes samples r, r+2, ... so each 2x2 step covers the same 4
    # samples as one step of batch 4, and DDP's gradient mean equals the single process's batch mean.
    common = ["fit", "--model", f"{TOY}.ToyRegression", "--model.dropout", "0", "--model.noise_std", "0"]
    common += ["--data", f"{TOY}.ToyData", "--data.shuffle", "false", "--trainer.max_epochs", "2"]
    common += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    common += ["--trainer.accelerator", "cpu", "--trainer.num_sanity_val_steps", "0"]

    single = main([*common, "--data.batch_size", "4", "--trainer.default_root_dir", str(tmp_path / "single")])
    expected_best = single.trainer.checkpoint_callback.best_model_score

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    ddp_args = ["--data.batch_size", "2", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    ddp_args += ["--trainer.default_root_dir", str(tmp_path / "ddp")]
    result = subprocess.run(
        [sys.executable, "-m", "lightning_cli", *common, *ddp_args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == single.trainer.global_step == 20
    single_state = single.model.state_dict()
    for name, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(value, single_state[name], rtol=1e-4, atol=1e-5)
    best = next(s for k, s in checkpoint["callbacks"].items() if "val/loss" in k)
    # val/loss is synced across ranks (mean of the ranks' means over equal halves of the val split).
    torch.testing.assert_close(best["best_model_score"], expected_best, rtol=1e-4, atol=1e-5)
