"""Is the S2 loader ever the bottleneck? Loader samples/s (2 workers) next to tiny-SimVP training samples/s.

Prints both rates and their ratio (goal: ratio >= 3, so data loading never limits training). Any config and
data work: ``python bench/s2_loader.py --config configs/simvp.yaml --root DIR --patch-size 128``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lightning_cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 3.0


def loader_samples_per_second(loader, batches: int) -> float:
    """Samples per second over ``batches`` batches, after one warm-up batch (worker start-up)."""
    iterator = iter(loader)
    next(iterator)
    samples, started = 0, time.perf_counter()
    for _ in range(batches):
        samples += next(iterator)["image"].shape[0]
    return samples / (time.perf_counter() - started)


def training_samples_per_second(module, batch: dict, steps: int) -> float:
    """Samples per second of full training steps (forward, loss, backward, optimizer) on one batch."""
    optimizer = module.configure_optimizers()
    module.train()

    def step() -> None:
        optimizer.zero_grad()
        module.training_step(batch, 0).backward()
        optimizer.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch["image"].shape[0] / (time.perf_counter() - started)


def run(config: str, root: str, patch_size: int, workers: int, batches: int, steps: int) -> float:
    cli = main(
        [
            "--config",
            config,
            "--data.init_args.root",
            root,
            "--data.init_args.patch_size",
            str(patch_size),
            "--data.init_args.num_workers",
            str(workers),
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    datamodule, module = cli.datamodule, cli.model
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batches = min(batches, len(loader) - 1)
    loader_rate = loader_samples_per_second(loader, batches)
    train_rate = training_samples_per_second(module, next(iter(loader)), steps)
    ratio = loader_rate / train_rate
    print(f"loader   ({workers} workers, {patch_size} px): {loader_rate:8.1f} samples/s")
    print(
        f"training ({type(module.network).__name__}, torch threads {torch.get_num_threads()}): {train_rate:8.1f} samples/s"
    )
    verdict = "ok" if ratio >= TARGET_RATIO else f"LOADER IS A BOTTLENECK (goal >= {TARGET_RATIO:g})"
    print(f"loader / training ratio: {ratio:.1f}  {verdict}")
    return ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs/tiny/simvp.yaml"))
    parser.add_argument("--root", default=str(REPO_ROOT / "data/demo"))
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    run(args.config, args.root, args.patch_size, args.workers, args.batches, args.steps)
