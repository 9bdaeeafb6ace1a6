"""Benchmark: one SatDiFuser training epoch without a feature cache, with the latent tier and with the pyramid tier.

All three runs build the model of the same config (default: the tiny CPU config) and train the same fusion and head
on the same synthetic batches; only ``cache_dir`` / ``cache_tier`` differ. Each run trains two epochs and the second
is timed (the first fills the cache). The three runs are interleaved and repeated (median reported) with torch
pinned to ``--threads`` threads, so the ratios hold on a shared machine. The extractor runs the paper's 50 DDIM
inversion steps. Goals at the tiny UNet: pyramid tier >= 10x, latent tier >= 3x faster than no cache.

Then, for the real SD 2.1 / DiffusionSat UNet (built on the meta device: shapes only, nothing downloaded), the
counted FLOPs and the bytes per sample of each tier at 256 and 512 px.

    python bench/difuser_cache.py [--config configs/tiny/difuser_cls.yaml] [--samples 32] [--repeats 3]

Measured 2026-12-01 (``--samples 16``, 1 thread, median of 3, 2 shared CPU cores): no cache 19.0 s per epoch,
latent tier 2.49 s (7.6x, 6.3 KB per sample), pyramid tier 1.58 s (12.0x, 318 KB per sample). Counted for the
real UNet: at 256 px 181 GFLOP per call, uncached 12 calls + VAE encoder (273 GFLOP) = 2.45 TFLOP per sample,
latent tier 0.54 TFLOP (4.5x less), 24 KiB vs 20.0 MiB per sample (855x), 42 GB of pyramids per m-eurosat epoch;
at 512 px 804 GFLOP per call, 10.8 vs 2.4 TFLOP, 96 KiB vs 80 MiB (168 GB per m-eurosat epoch).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from jsonargparse import ArgumentParser
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

import lightning_cli.cli  # noqa: F401  (imports every package so config class paths resolve)
from networks.difuser.extractor import inversion_path

TIERS = ("none", "latents", "pyramid")
# SD 2.1 (and DiffusionSat, which keeps its UNet) in diffusers' terms
SD21_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD21_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
EUROSAT_TRAIN_SAMPLES = 2000  # GEO-Bench m-eurosat train split


class EpochTimer(Callback):
    """Wall time of every training epoch."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.times.append(time.perf_counter() - self.start)


def build_model(
    config_path: str, cache_dir: str | None, tier: str, num_classes: int, inversion_steps: int
) -> LightningModule:
    """The config's model with the task given directly (no datamodule), the paper's number of DDIM inversion steps
    (the tiny config uses fewer to keep tests fast) and the chosen cache."""
    model = yaml.safe_load(Path(config_path).read_text())["model"]
    model["init_args"]["extractor"]["init_args"]["num_inversion_steps"] = inversion_steps
    model["init_args"].update(
        {
            "cache_dir": cache_dir,
            "cache_tier": tier,
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


def run_tier(args, loader: DataLoader, tier: str) -> tuple[float, float]:
    """Second-epoch time and cache bytes per sample of one tier."""
    with tempfile.TemporaryDirectory() as cache_dir:
        torch.manual_seed(0)
        model = build_model(
            args.config, None if tier == "none" else cache_dir, "latents" if tier == "none" else tier,
            args.num_classes, args.inversion_steps,
        )  # fmt: skip
        seconds = timed_epoch(model, loader, args.accelerator)
        files = list(Path(cache_dir).rglob("*.safetensors"))
        return seconds, sum(f.stat().st_size for f in files) / max(len(files), 1)


def real_unet_costs(image_size: int, timesteps: int = 3, inversion_steps: int = 50) -> dict[str, float]:
    """Counted FLOPs of one SD 2.1 UNet call and of the VAE encoder, and the bytes per sample (float16) of the
    latent and pyramid tiers (ResNet residual + self-attention decoder maps at ``timesteps`` timesteps)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=image_size // 8, **SD21_UNET)
        vae = AutoencoderKL(**SD21_VAE)
    latent = torch.zeros(1, 4, image_size // 8, image_size // 8, device="meta")
    condition = torch.zeros(1, 77, 1024, device="meta")
    pyramid_values = []
    hooked = [m for block in unet.up_blocks for r in block.resnets for m in [r.conv2]]
    hooked += [m for name, m in unet.up_blocks.named_modules() if name.endswith("attn1")]
    handles = [m.register_forward_hook(lambda m, a, out: pyramid_values.append(out.numel())) for m in hooked]
    with FlopCounterMode(display=False) as counter:
        unet(latent, 10, encoder_hidden_states=condition)
    unet_flops = counter.get_total_flops()
    for handle in handles:
        handle.remove()
    with FlopCounterMode(display=False) as counter:
        vae.encode(torch.zeros(1, 3, image_size, image_size, device="meta"))
    vae_flops = counter.get_total_flops()
    calls = len(inversion_path([1, 100, 200][:timesteps], inversion_steps, 1000))  # one per visited timestep
    return {
        "unet_gflop": unet_flops / 1e9,
        "uncached_tflop": (calls * unet_flops + vae_flops) / 1e12,
        "latent_tier_tflop": timesteps * unet_flops / 1e12,
        "calls": calls,
        "vae_gflop": vae_flops / 1e9,
        "latent_bytes": timesteps * latent.numel() * 2,
        "pyramid_bytes": timesteps * sum(pyramid_values) * 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny/difuser_cls.yaml")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64, help="input size before the extractor's resize")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--inversion-steps", type=int, default=50, help="DDIM inversion steps (paper: 50)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned for stable ratios)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loader = synthetic_batches(args.samples, args.image_size, args.num_classes, args.batch_size)
    times: dict[str, list[float]] = {tier: [] for tier in TIERS}
    sizes: dict[str, float] = {}
    for _ in range(args.repeats):
        for tier in TIERS:
            seconds, sizes[tier] = run_tier(args, loader, tier)
            times[tier].append(seconds)
    median = {tier: statistics.median(values) for tier, values in times.items()}

    print(
        f"config {args.config}: {args.samples} samples, batch {args.batch_size}, input {args.image_size} px, "
        f"{args.inversion_steps} inversion steps, {args.threads} thread(s), median of {args.repeats}"
    )
    print(f"{'tier':10s} {'epoch s':>9s} {'speed-up':>9s} {'bytes/sample':>13s}")
    for tier, goal in zip(TIERS, ("", "(goal >= 3x)", "(goal >= 10x)"), strict=True):
        print(
            f"{tier:10s} {median[tier]:9.3f} {median['none'] / median[tier]:8.1f}x {sizes[tier]:13.0f} {goal}"
        )
    print(
        "\nreal SD 2.1 / DiffusionSat UNet (meta device, counted), timesteps 1/100/200, 50 inversion steps:"
    )
    for image_size in (256, 512):
        costs = real_unet_costs(image_size)
        print(
            f"  {image_size} px: {costs['unet_gflop']:.0f} GFLOP per UNet call, VAE encoder {costs['vae_gflop']:.0f} "
            f"GFLOP; uncached {costs['calls']} calls + VAE = {costs['uncached_tflop']:.2f} TFLOP per sample, latent "
            f"tier 3 calls = {costs['latent_tier_tflop']:.2f} TFLOP ({costs['uncached_tflop'] / costs['latent_tier_tflop']:.1f}x "
            f"less); bytes per sample (float16): latents {costs['latent_bytes'] / 1024:.0f} KiB, pyramid "
            f"{costs['pyramid_bytes'] / 2**20:.1f} MiB ({costs['pyramid_bytes'] / costs['latent_bytes']:.0f}x); "
            f"pyramid tier per m-eurosat epoch {EUROSAT_TRAIN_SAMPLES * costs['pyramid_bytes'] / 1e9:.0f} GB"
        )


if __name__ == "__main__":
    main()
