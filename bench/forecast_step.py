"""Sat-JEPA-Diff training-step and sampling benchmark (tiny config, or SD3.5 Medium-shaped random weights).

Prints: training step time and peak memory; the share of step time spent outside the forward/backward of the
trainable path (VAE encoding of the target, EMA target encoder, optimizer step; goal < 10%); sampling latency
per frame at ``--num-steps`` Euler steps. On CPU keep the real-size run short, e.g.
    python bench/forecast_step.py                     # tiny config, 64 px, batch 8
    python bench/forecast_step.py --real --batch-size 1 --steps 1 --size 128   # SD3.5M shapes on CPU
    python bench/forecast_step.py --real              # SD3.5M shapes, 128 px, batch 8 (GPU, bf16 autocast)
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "configs" / "tiny" / "forecast.yaml"
REAL_CONFIG = REPO_ROOT / "configs" / "bench" / "forecast_sd35m_random.yaml"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Mean seconds of ``fn`` over ``repeats`` calls after one warm-up call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def synthetic_batch(batch_size: int, size: int, device: torch.device) -> dict:
    image = torch.rand(batch_size, 1, 3, size, size, device=device)
    return {
        "image": image,
        "target": image[:, -1].roll(3, dims=-1),
        "mask": torch.ones(batch_size, size, size, dtype=torch.bool, device=device),
        "embedding": torch.randn(batch_size, 64, size, size, device=device),
        "has_embedding": torch.ones(batch_size, dtype=torch.bool, device=device),
    }


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = REAL_CONFIG if args.real else TINY_CONFIG
    overrides = [
        "--trainer.logger=false",
        f"--model.init_args.flow_matching.init_args.num_steps={args.num_steps}",
        f"--data.init_args.patch_size={args.size}",
    ]
    if args.real:
        overrides += [
            f"--model.init_args.encoder.init_args.img_size={args.size}",
            f"--model.init_args.predictor.init_args.grid_size={args.size // 8}",
            f"--model.init_args.adapter.init_args.semantic_grid={args.size // 8}",
            f"--model.init_args.mask_generator.init_args.grid_size={args.size // 8}",
        ]
    module = main(["--config", str(config), *overrides], run=False).model.to(device)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = synthetic_batch(args.batch_size, args.size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    module.log = module.log_dict = lambda *a, **k: None  # no trainer attached
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def train_step() -> None:
        module.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()

    def outside_trainable_path() -> None:
        with torch.no_grad(), autocast:
            module.backbone.encode(batch["target"])
            if module.use_ijepa:
                module.target_encoder(batch["target"])

    step = timed(train_step, device, args.steps)
    memory = peak_memory_mib(device)
    frozen_inputs = timed(outside_trainable_path, device, args.steps)
    optimizer_step = timed(optimizer.step, device, args.steps)
    outside = frozen_inputs + optimizer_step

    module.eval()
    frame = batch["image"][:1]
    with torch.no_grad(), autocast:
        sampling = timed(lambda: module.forecast(frame), device, max(1, args.steps))

    trainable_count = sum(p.numel() for p in trainable)
    total_count = sum(p.numel() for p in module.parameters())
    print(
        f"config: {config.relative_to(REPO_ROOT)}  device: {device}  batch {args.batch_size} x {args.size} px"
    )
    print(f"parameters: {trainable_count / 1e6:.2f}M trainable of {total_count / 1e6:.2f}M")
    print(f"training step: {step * 1000:.1f} ms  ({args.batch_size / step:.2f} samples/s)")
    print(f"peak memory: {memory:.0f} MiB ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})")
    print(
        f"outside the trainable forward/backward: {outside * 1000:.1f} ms = {100 * outside / step:.1f}% of the step "
        f"(VAE target encoding + EMA encoder {frozen_inputs * 1000:.1f} ms, optimizer {optimizer_step * 1000:.1f} ms;"
        " goal < 10%)"
    )
    print(f"sampling: {sampling * 1000:.1f} ms per {args.size} px frame at {args.num_steps} Euler steps")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--real", action="store_true", help="SD3.5 Medium-shaped random model instead of tiny"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=None, help="patch size in px (tiny 64, real 128)")
    parser.add_argument("--steps", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--num-steps", type=int, default=20, help="Euler sampling steps")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    args.size = args.size or (128 if args.real else 64)
    return args


if __name__ == "__main__":
    torch.manual_seed(0)
    run(parse_args())
