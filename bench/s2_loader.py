"""Can the S2 loader feed a GPU? Loader samples/s with the configured workers against what training consumes.

The goal: loader samples/s >= 3x the samples/s a GPU training step of the paper config consumes. That rate is
an assumption printed with the result (``GPU_ASSUMPTION``). A small shared machine cannot run the configured
workers side by side, so the bench measures the loader with 1 and 2 workers (medians of ``--repeats``): wall
samples/s, and samples per CPU second of the workers (what a worker with a core of its own delivers, whatever else
runs here), which it projects linearly to the configured count; the assumption is printed with the 2-vs-1 wall
scaling measured here. ``--train-steps N`` also times N training steps of the configured model on this machine (configs whose networks build locally, e.g. ``configs/tiny/*.yaml`` or
``configs/simvp.yaml``). ``--published`` writes a scaled-down dataset of the published shape (RGB and 64-band
embeddings) instead of reading ``--root``. Examples::

    python bench/s2_loader.py --config configs/simvp.yaml --root DIR --patch-size 128
    python bench/s2_loader.py --config configs/forecast.yaml --published --train-steps 0
    python bench/s2_loader.py --config configs/forecast.yaml --root DIR --embedding-patch-size 1  # per pixel
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from datamodules.s2_timeseries import S2ForecastDataModule, collate_s2  # noqa: E402
from datamodules.synthetic.s2 import make_published_shape_dataset  # noqa: E402
from lightning_cli import main  # noqa: E402

TARGET_RATIO = 3.0
GPU_SAMPLES_PER_SECOND = 200.0
GPU_ASSUMPTION = (
    "a paper-config training step (Sat-JEPA-Diff: SD3.5M transformer + I-JEPA ViT-B, 128 px, batch 8) consumes "
    f"about {GPU_SAMPLES_PER_SECOND:.0f} samples/s: counted forward+backward FLOPs per sample at 40% of an H100's "
    "bf16 dense peak (an estimate, not a measurement)"
)


def data_init_args(config: str) -> dict[str, Any]:
    """The DataModule arguments of a config's ``data`` section (the model is not built)."""
    data = yaml.safe_load(Path(config).read_text())["data"]
    return dict(data.get("init_args", {}))


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def loader_samples_per_second(
    datamodule: S2ForecastDataModule, workers: int, batches: int
) -> tuple[float, float]:
    """Samples per wall second of the train loader with ``workers`` (>= 1) workers over ``batches`` batches, after
    one warm-up batch per worker (worker start-up); and samples per CPU second of its workers over the whole epoch
    (start-up included), which other load on a shared machine does not change."""
    datamodule.num_workers = workers
    cpu_before = children_cpu_seconds()
    iterator = iter(datamodule.train_dataloader())
    for _ in range(workers):
        next(iterator)
    samples, started = 0, time.perf_counter()
    for _ in range(batches):
        samples += next(iterator)["image"].shape[0]
    wall_rate = samples / (time.perf_counter() - started)
    epoch_samples = (workers + batches) * datamodule.batch_size + sum(b["image"].shape[0] for b in iterator)
    del iterator  # the workers exit and are reaped, so their CPU time is counted
    return wall_rate, epoch_samples / (children_cpu_seconds() - cpu_before)


def collate_milliseconds(dataset, batch_size: int, repeats: int = 5) -> float:
    """Median time of collating one batch of already loaded samples."""
    samples = [dataset[i % len(dataset)] for i in range(batch_size)]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        collate_s2(samples)
        times.append(time.perf_counter() - started)
    return 1000 * sorted(times)[len(times) // 2]


def first_optimizer(configured: Any) -> torch.optim.Optimizer:
    """The optimizer from any ``configure_optimizers`` return form (optimizer, dict, list or tuple)."""
    if isinstance(configured, dict):
        return first_optimizer(configured["optimizer"])
    if isinstance(configured, list | tuple):
        return first_optimizer(configured[0])
    return configured


def training_samples_per_second(module, batch: dict, steps: int) -> float:
    """Samples per second of full training steps (forward, loss, backward, optimizer) on one batch."""
    optimizer = first_optimizer(module.configure_optimizers())
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


def run(
    config: str,
    root: str,
    patch_size: int | None,
    workers: int | None,
    batches: int,
    steps: int,
    embedding_patch_size: int | None = None,
    repeats: int = 3,
) -> float:
    torch.set_num_threads(1)
    overrides = {"root": root, "patch_size": patch_size, "embedding_patch_size": embedding_patch_size}
    init_args = data_init_args(config) | {key: value for key, value in overrides.items() if value is not None}
    configured = workers if workers is not None else init_args.get("num_workers", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datamodule = S2ForecastDataModule(**init_args)
        datamodule.setup("fit")
    batches = min(batches, len(datamodule.train_dataset) // datamodule.batch_size - 2)
    measured = {
        count: [loader_samples_per_second(datamodule, count, batches) for _ in range(repeats)]
        for count in (1, 2)
    }
    rates = {count: statistics.median(wall for wall, _ in runs) for count, runs in measured.items()}
    per_core = statistics.median(cpu for runs in measured.values() for _, cpu in runs)
    collate_ms = collate_milliseconds(datamodule.train_dataset, datamodule.batch_size)
    dataset = datamodule.train_dataset
    print(
        f"loader ({datamodule.patch_size} px, batch {datamodule.batch_size}, embeddings {dataset.has_embeddings}, "
        f"embedding_patch_size {datamodule.embedding_patch_size}; median of {repeats} x {batches} batches): "
        f"1 worker {rates[1]:.1f} samples/s, 2 workers {rates[2]:.1f} samples/s (x{rates[2] / rates[1]:.2f}; "
        f"linear would be x2, this machine has {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}), "
        f"{per_core:.1f} samples per worker CPU second, collate {collate_ms:.1f} ms/batch"
    )
    workers_count = max(configured, 1)
    loader_rate = per_core * workers_count
    print(
        f"assumption: loader samples/s grow linearly with workers while each has a core of its own (a GPU node "
        f"gives the {configured} configured workers theirs): {workers_count} x {per_core:.1f} samples per CPU "
        f"second ~ {loader_rate:.1f} samples/s ({workers_count} x the 1-worker wall rate here: "
        f"{rates[1] * workers_count:.1f})"
    )
    print(f"assumption: {GPU_ASSUMPTION}")
    ratio = loader_rate / GPU_SAMPLES_PER_SECOND
    verdict = "ok" if ratio >= TARGET_RATIO else f"LOADER WOULD STARVE THE GPU (goal >= {TARGET_RATIO:g})"
    print(f"loader / paper GPU consumption: {ratio:.1f}  {verdict}")
    if steps > 0:
        cli_args = ["--config", config, "--trainer.logger", "false"]
        cli_args += [
            f"--data.init_args.{key}={value}" for key, value in overrides.items() if value is not None
        ]
        module = main(cli_args, run=False).model
        train_rate = training_samples_per_second(module, next(iter(datamodule.train_dataloader())), steps)
        print(
            f"training here ({type(module).__name__}, torch threads {torch.get_num_threads()}): "
            f"{train_rate:8.1f} samples/s; loader / training here: {loader_rate / train_rate:.1f}"
        )
    return ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs/tiny/simvp.yaml"))
    parser.add_argument("--root", default=None, help="default: the config's data root")
    parser.add_argument("--published", action="store_true", help="generate a published-shape dataset")
    parser.add_argument("--regions", type=int, default=20, help="with --published")
    parser.add_argument("--size", type=int, default=384, help="with --published: tile size in px")
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="default: the config's num_workers")
    parser.add_argument("--embedding-patch-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="loader timings per worker count (median)")
    parser.add_argument("--train-steps", type=int, default=10)
    args = parser.parse_args()
    root = args.root
    with tempfile.TemporaryDirectory() as folder:
        if args.published:
            root = str(
                make_published_shape_dataset(Path(folder), regions=args.regions, years=3, size=args.size)
            )
        elif root is None and "root" in data_init_args(args.config):
            root = str(REPO_ROOT / data_init_args(args.config)["root"])
        run(
            args.config,
            root,
            args.patch_size,
            args.workers,
            args.batches,
            args.train_steps,
            args.embedding_patch_size,
            args.repeats,
        )
