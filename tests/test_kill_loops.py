"""``fit`` killed with SIGKILL at random points, several times, ends bit-identical to an uninterrupted run: the real
modules (tiny SimVP, tiny Sat-JEPA-Diff forecast, tiny DiFuser) with 2 loader workers and with 2 DDP ranks (CPU,
gloo, deterministic mode). Slow, as the single DDP kill-and-resume case of test_ddp.py; the fast kill-and-resume cases are in
test_checkpoint_resume.py."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.synthetic.geobench import write_eurosat
from tests.conftest import REPO_ROOT

TINY = REPO_ROOT / "configs" / "tiny"
DEMO_DATA = REPO_ROOT / "data" / "demo"
LAYOUTS = {
    "2 workers": ["--data.init_args.num_workers", "2"],
    "2 DDP ranks": ["--trainer.strategy", "ddp", "--trainer.devices", "2"],
}
KILLS = 3


def _model_args(model: str, tmp_path: Path) -> list[str]:
    if model == "difuser":
        write_eurosat(tmp_path / "geobench")
        return [
            "--config",
            str(TINY / "difuser_cls.yaml"),
            "--data.init_args.root",
            str(tmp_path / "geobench"),
        ]
    config = {"simvp": "simvp.yaml", "forecast": "forecast.yaml"}[model]
    return ["--config", str(TINY / config), "--data.init_args.root", str(DEMO_DATA)]


def _operations(tmp_path: Path) -> Path:
    path = tmp_path / "operations.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "accelerator": "cpu",
                    "max_epochs": 2,
                    "limit_train_batches": 4,
                    "limit_val_batches": 1,
                    "num_sanity_val_steps": 0,
                    "deterministic": True,
                    "logger": False,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "callbacks": [
                        {"class_path": "callbacks.TrainableEMA", "init_args": {"decay": 0.9}},
                        {"class_path": "callbacks.LastCheckpoint", "init_args": {"every_n_train_steps": 1}},
                    ],
                }
            }
        )
    )
    return path


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_cli", "fit", *args],
        cwd=REPO_ROOT,  # the tiny forecast config names its tokenizer folder relative to the repository
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the kill reaches every rank and worker
    )


def _step(path: Path) -> int:
    return torch.load(path, weights_only=False)["global_step"] if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model", ["simvp", "forecast", "difuser"])
def test_random_sigkills_then_resume_match_uninterrupted_run(tmp_path, model, layout):
    args = [*_model_args(model, tmp_path), "--config", str(_operations(tmp_path)), *LAYOUTS[layout]]
    reference = _start([*args, "--trainer.default_root_dir", str(tmp_path / "reference")])
    output = reference.communicate(timeout=900)[0]
    assert reference.returncode == 0, output[-3000:]
    expected = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=False)

    chance = random.Random(f"{model}-{layout}")
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    run = [*args, "--trainer.default_root_dir", str(tmp_path / "killed")]
    for _ in range(KILLS):
        process = _start([*run, "--ckpt_path", "last"] if last.exists() else run)
        target = min(_step(last) + chance.randint(1, 2), expected["global_step"] - 1)  # before the run ends
        deadline = time.monotonic() + 600
        while _step(last) < target:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
            time.sleep(0.05)
        time.sleep(chance.uniform(0.0, 1.0))  # anywhere in the next step, a save included
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    final = _start([*run, "--ckpt_path", "last"])
    output = final.communicate(timeout=900)[0]
    assert final.returncode == 0, output[-3000:]

    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == expected["global_step"]
    torch.testing.assert_close(resumed["state_dict"], expected["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["ema"], expected["ema"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["optimizer_states"], expected["optimizer_states"], rtol=0, atol=0)
