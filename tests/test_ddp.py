"""DDP on CPU (gloo): a 2-process run matches a 1-process run with the same global batch; metrics are synced; a run
killed mid-epoch resumes bit-exactly (each rank at its own offset, with its own restored RNG stream)."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_cli import main
from tests.conftest import REPO_ROOT

TOY = "tests.fixtures.toy_training"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _run_ddp(args: list[str]) -> None:
    """``python -m lightning_cli <args>`` on 2 CPU processes (Lightning launches the second one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    ddp = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "lightning_cli", *args, *ddp],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def assert_two_ranks_of_2_match_one_process_of_4(
    tmp_path: Path, common: list[str], trained_prefix: str
) -> None:
    """Fit ``common`` as one process at batch 4 and as 2 DDP ranks at batch 2; both take 2 optimizer steps and
    end with the same trained weights (``trained_prefix`` names a part that must be among them)."""
    single = main(
        [*common, "--data.init_args.batch_size", "4", "--trainer.default_root_dir", str(tmp_path / "one")]
    )
    _run_ddp(
        [*common, "--data.init_args.batch_size", "2", "--trainer.default_root_dir", str(tmp_path / "ddp")]
    )
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == single.trainer.global_step == 2
    single_state = single.model.state_dict()
    assert any(name.startswith(trained_prefix) for name in checkpoint["state_dict"])
    for name, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(value, single_state[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow  # the forecast and DiFuser parity tests below cover the same path with the real modules
def test_two_process_ddp_matches_single_process(tmp_path):
    # Deterministic case: no dropout/noise and plain SGD (AdamW's first step is lr * sign(g), which turns float
    # rounding of near-zero gradients into 2 * lr). Lightning always gives the DDP train loader a shuffled
    # DistributedSampler seeded by (seed, epoch); ExactResume's single-process sampler draws the same permutation,
    # so each DDP step (2 ranks x 2 samples) covers the same 4 samples as one single-process step of batch 4.
    common = ["fit", "--model", f"{TOY}.ToyRegression", "--model.dropout", "0", "--model.noise_std", "0"]
    common += ["--model.optimizer", "torch.optim.SGD", "--model.lr", "0.05"]
    common += ["--data", f"{TOY}.ToyData", "--data.shuffle", "true", "--trainer.max_epochs", "2"]
    common += ["--trainer.logger", "false", "--trainer.num_sanity_val_steps", "0", *QUIET]

    single = main([*common, "--data.batch_size", "4", "--trainer.default_root_dir", str(tmp_path / "single")])
    _run_ddp([*common, "--data.batch_size", "2", "--trainer.default_root_dir", str(tmp_path / "ddp")])

    checkpoint = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == single.trainer.global_step == 20
    single_state = single.model.state_dict()
    assert set(checkpoint["state_dict"]) == {name for name in single_state if name.startswith("head.")}
    initial = type(single.model)(dropout=0.0, noise_std=0.0).state_dict()  # seed 0 rebuilds the start weights
    for name, value in checkpoint["state_dict"].items():
        assert not torch.allclose(value, initial[name], atol=1e-3), f"{name} did not train"
        torch.testing.assert_close(value, single_state[name], rtol=1e-4, atol=1e-6)
    best = next(s for k, s in checkpoint["callbacks"].items() if "val/loss" in k)
    # val/loss is synced across ranks (mean of the ranks' means over equal halves of the val split).
    expected_best = single.trainer.checkpoint_callback.best_model_score
    torch.testing.assert_close(best["best_model_score"], expected_best, rtol=1e-5, atol=1e-7)


def test_simvp_trains_under_ddp_and_its_val_metrics_cover_the_global_split(tmp_path):
    # The 12 demo validation windows split 6/6 over the ranks (no padding); torchmetrics states and logged values are
    # reduced across ranks, so the DDP values must equal a single process validating the same weights.
    config = [
        "--config",
        str(REPO_ROOT / "configs" / "tiny" / "simvp.yaml"),
        "--trainer.num_sanity_val_steps",
        "0",
    ]
    config += ["--data.init_args.root", str(REPO_ROOT / "data" / "demo"), *QUIET]
    run_dir = tmp_path / "ddp"
    _run_ddp(
        ["fit", *config, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
        + ["--data.init_args.batch_size", "2", "--trainer.default_root_dir", str(run_dir)]
        + [
            "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir",
            str(run_dir),
        ]
    )
    (metrics_csv,) = run_dir.rglob("metrics.csv")
    with metrics_csv.open() as handle:
        (logged,) = [row for row in csv.DictReader(handle) if row["val/loss"]]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2

    single = main(
        ["validate", *config, "--trainer.logger", "false", "--data.init_args.batch_size", "4"]
        + ["--ckpt_path", str(last)]
        + ["--trainer.default_root_dir", str(tmp_path / "single")]
    )
    expected = single.trainer.callback_metrics
    names = {"val/loss", "val/l1", "val/mse", "val/psnr", "val/ssim", "val/gssim"}
    assert names <= set(expected)
    for name in names:
        assert float(logged[name]) == pytest.approx(float(expected[name]), rel=1e-5), name


@pytest.mark.slow  # 100 s; test_kill_loops.py's "2 DDP ranks" layout kills and resumes DDP runs as well
def test_ddp_run_killed_mid_epoch_resumes_exactly(tmp_path):
    # Dropout and loss noise draw from each rank's own stream; 10 steps of 2 ranks x 2 samples per epoch.
    config = tmp_path / "toy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 0,
                "model": {"class_path": f"{TOY}.ToyRegression"},
                "data": {"class_path": f"{TOY}.ToyData", "init_args": {"batch_size": 2, "augment_std": 0.1}},
                "trainer": {
                    "max_epochs": 2,
                    "deterministic": True,
                    "logger": False,
                    "num_sanity_val_steps": 0,
                    "callbacks": [
                        {"class_path": "callbacks.TrainableEMA", "init_args": {"decay": 0.9}},
                        {"class_path": "callbacks.LastCheckpoint", "init_args": {"every_n_train_steps": 2}},
                    ],
                },
            }
        )
    )

    def fit(root, step_sleep=0.0):  # the killed run sleeps per step, to be killed mid-epoch
        (tmp_path / root).mkdir(exist_ok=True)
        args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / root), *QUIET]
        return [*args, "--model.init_args.step_sleep", str(step_sleep)]

    _run_ddp([*fit("reference"), "--model.init_args.noise_log_dir", str(tmp_path / "reference")])
    reference = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=False)
    noise = [(tmp_path / "reference" / f"noise_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert noise[0][1::2] != noise[1][1::2], "both ranks drew the same noise"

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    ddp = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    first = subprocess.Popen(
        [sys.executable, "-m", "lightning_cli", *fit("killed", step_sleep=0.2), *ddp],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not (last.exists() and torch.load(last, weights_only=False)["global_step"] >= 4):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # every rank, mid-epoch 0
    first.communicate()
    killed_at = torch.load(last, weights_only=False)["global_step"]
    assert 4 <= killed_at < 10

    _run_ddp([*fit("killed"), "--ckpt_path", "last"])
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == reference["global_step"] == 20
    torch.testing.assert_close(resumed["state_dict"], reference["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["ema"], reference["ema"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["optimizer_states"], reference["optimizer_states"], rtol=0, atol=0)


def test_difuser_two_process_ddp_matches_single_process(tmp_path):
    # Tiny DiFuser (classification): 4 training images, one step per epoch of 4 images (1 x 4, or 2 ranks x 2). Plain
    # SGD, as in the toy case; the head must start from the same weights however many processes there are.
    from datamodules.synthetic.geobench import write_eurosat

    root = tmp_path / "geobench"
    write_eurosat(root)
    common = ["fit", "--config", str(REPO_ROOT / "configs" / "tiny" / "difuser_cls.yaml")]
    common += ["--data.init_args.root", str(root), "--model.init_args.optimizer", "torch.optim.SGD"]
    common += ["--trainer.max_epochs", "2", "--trainer.num_sanity_val_steps", "0", *QUIET]
    assert_two_ranks_of_2_match_one_process_of_4(tmp_path, common, trained_prefix="head.")


TINY_FORECAST = ["--config", str(REPO_ROOT / "configs" / "tiny" / "forecast.yaml")]
# Off here, as they depend on the batch a rank holds: the adapter's reference dropout and the SSIM subset (per-batch
# draws: a subset of 2 of 4 samples is not two subsets of 1 of 2) and the I-JEPA contrastive term (InfoNCE with the
# other samples of the rank's batch as negatives). Every per-sample draw (masks, noise levels, noise) stays on.
PER_SAMPLE_TERMS_ONLY = [
    "--model.init_args.adapter.init_args.reference_dropout",
    "0",
    "--model.init_args.ssim_subset",
    "null",
    "--model.init_args.ijepa_loss",
    '{"class_path": "metrics.losses.HybridIJEPALoss", "init_args": {"contrastive_weight": 0}}',
]


def _forecast_batch(regions: list[str]) -> dict:
    """Demo-sized forecasting samples; ``regions`` name them (equal names, equal pixels)."""
    images, targets, embeddings = [], [], []
    for region in regions:
        generator = torch.Generator().manual_seed(sum(map(ord, region)))
        images.append(torch.rand(1, 3, 64, 64, generator=generator))
        targets.append(torch.rand(3, 64, 64, generator=generator))
        embeddings.append(torch.randn(64, 64, 64, generator=generator))
    size = len(regions)
    return {
        "image": torch.stack(images),
        "target": torch.stack(targets),
        "mask": torch.ones(size, 64, 64, dtype=torch.bool),
        "embedding": torch.stack(embeddings),
        "has_embedding": torch.ones(size, dtype=torch.bool),
        "region": regions,
        "target_time": ["t1"] * size,
        "transform": [(10.0, 0.0, 1000.0, 0.0, -10.0, 5000.0)] * size,
    }


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_forecast_training_draws_are_per_sample_so_half_batches_average_to_the_whole(monkeypatch):
    # What makes 2 ranks x batch b train like one process x batch 2b: the loss terms left on are means over samples,
    # and each sample draws its mask positions, noise level and noise by its own identity, whichever batch holds it.
    monkeypatch.chdir(REPO_ROOT)  # the tiny config names its tokenizer relative to the repository
    module = main([*TINY_FORECAST, *PER_SAMPLE_TERMS_ONLY, "--trainer.logger", "false"], run=False).model
    module.train()
    regions = ["a", "b", "c", "d"]
    with torch.no_grad():
        whole = module.training_step(_forecast_batch(regions), 0)
        halves = [module.training_step(_forecast_batch(part), 0) for part in (regions[:2], regions[2:])]
        torch.testing.assert_close(whole, torch.stack(halves).mean(), rtol=1e-5, atol=0)
        # the same pixels under another identity draw otherwise (so do DDP ranks, which hold other samples)
        renamed = _forecast_batch(["a"])
        renamed["region"] = ["a2"]
        assert not torch.equal(
            module.training_step(_forecast_batch(["a"]), 0), module.training_step(renamed, 0)
        )


def test_forecast_two_process_ddp_matches_single_process(tmp_path, monkeypatch):
    # Tiny Sat-JEPA-Diff: 2 steps of 4 random crops (1 x 4, or 2 ranks x 2, the same crops by ExactResume's order).
    monkeypatch.chdir(REPO_ROOT)  # the tiny config names its tokenizer relative to the repository
    common = ["fit", *TINY_FORECAST, "--data.init_args.root", str(REPO_ROOT / "data" / "demo")]
    common += [*PER_SAMPLE_TERMS_ONLY, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    common += ["--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
    common += ["--trainer.logger", "false", *QUIET]
    assert_two_ranks_of_2_match_one_process_of_4(tmp_path, common, trained_prefix="adapter.")
