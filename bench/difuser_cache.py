"""Benchmark: one SatDiFuser training epoch with a warm feature cache vs. running the frozen extractor every step.

Both runs build the model of the same config (default: the tiny CPU config) and train the same fusion and head on
the same synthetic batches; only ``cache_dir`` differs. Each run trains two epochs and the second epoch is timed
(for the cached run the first epoch fills the cache, so the second is warm). The extractor runs the paper's
50 DDIM inversion steps unless told otherwise. Prints epoch times, their ratio
(goal >= 10x) and the cache size per sample.

    python bench/difuser_cache.py [--config configs/tiny/difuser_cls.yaml] [--samples 64] [--batch-size 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

import lightning_cli.cli  # noqa: F401  (imports every package so config class paths resolve)


class EpochTimer(Callback):
    """Wall time of every training epoch."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.times.append(time.perf_counter() - self.start)


def build_model(
    config_path: str, cache_dir: str | None, num_classes: int, inversion_steps: int
) -> LightningModule:
    """The config's model, with the task given directly (no datamodule), the paper's number of DDIM inversion
    steps (the tiny config uses fewer to keep tests fast) and the chosen cache folder."""
    model = yaml.safe_load(Path(config_path).read_text())["model"]
    model["init_args"]["extractor"]["init_args"]["num_inversion_steps"] = inversion_steps
    model["init_args"].update(
        {
            "cache_dir": cache_dir,
            "num_classes": num_classes,
            "task_type": "classification",
            "dataset_key": "bench",
        }
    )
    parser = ArgumentParser()
    parser.add_argument("--model", type=LightningModule)
    return parser.instantiate(parser.parse_object({"model": model})).model


def synthetic_batches(samples: int, size: int, num_classes: int, batch_size: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    items = [
        {
            "image": torch.rand(3, size, size, generator=generator),
            "label": i % num_classes,
            "sample": f"s{i:05d}",
        }
        for i in range(samples)
    ]
    return DataLoader(items, batch_size=batch_size, shuffle=False)


def timed_epoch(model: LightningModule, loader: DataLoader, accelerator: str) -> float:
    timer = EpochTimer()
    trainer = Trainer(
        max_epochs=2,
        accelerator=accelerator,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, train_dataloaders=loader)
    return timer.times[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny/difuser_cls.yaml")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64, help="input size before the extractor's resize")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--inversion-steps", type=int, default=50, help="DDIM inversion steps (paper: 50)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loader = synthetic_batches(args.samples, args.image_size, args.num_classes, args.batch_size)
    torch.manual_seed(0)
    model = build_model(args.config, None, args.num_classes, args.inversion_steps)
    uncached = timed_epoch(model, loader, args.accelerator)
    with tempfile.TemporaryDirectory() as cache_dir:
        torch.manual_seed(0)
        model = build_model(args.config, cache_dir, args.num_classes, args.inversion_steps)
        cached = timed_epoch(model, loader, args.accelerator)
        files = list(Path(cache_dir).rglob("*.safetensors"))
        size_per_sample = sum(f.stat().st_size for f in files) / max(len(files), 1)

    print(
        f"config {args.config}: {args.samples} samples, batch {args.batch_size}, input {args.image_size} px, "
        f"{args.inversion_steps} inversion steps ({len(model.extractor.path) + 1} UNet calls per batch)"
    )
    print(f"epoch, extractor every step : {uncached:8.3f} s")
    print(f"epoch, warm feature cache   : {cached:8.3f} s")
    print(f"speed-up (goal >= 10x)      : {uncached / cached:8.1f} x")
    print(f"cache size per sample       : {size_per_sample / 1024:8.1f} KiB ({len(files)} files)")


if __name__ == "__main__":
    main()
