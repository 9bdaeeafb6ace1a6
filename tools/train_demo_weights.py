"""Train the tiny "pretrained" SD3 parts of the demo on real Sentinel-2 RGB, then fine-tune tiny Sat-JEPA-Diff.

A random frozen VAE cannot show a forecast of the place, so the tiny configs load weights made here from the
shipped demo data (training regions only, as ``datamodules.S2ForecastDataModule`` splits them) and the six real
BigEarthNet patches of ``../shared/data``:

1. a tiny SD3-style VAE (diffusers ``AutoencoderKL`` without quant convs, the architecture of
   ``configs/tiny/forecast.yaml``), trained on random crops with L1 + MSE + a small KL; its shift and scaling
   factors are computed from the trained latents as SD3 does (mean, then 1 / std);
2. the tiny SD3 transformer, pretrained with rectified flow on those latents under the fixed prompt (what the
   real SD3.5 is: a frozen generative base);
3. the full tiny recipe (LoRA + adapter + I-JEPA) fitted through ``lightning_cli fit`` on the tiny config with
   those weights; its best checkpoint (on the validation region) is shipped.

Writes ``vae.safetensors``, ``transformer.safetensors`` (shift/scale in the VAE file's metadata) and
``forecast.ckpt`` into ``--out``. Deterministic for a given seed and thread count.

Usage: ``python tools/train_demo_weights.py [--out data/weights/tiny_sd3] [--seed 0]``
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
import yaml
from diffusers import AutoencoderKL, SD3Transformer2DModel
from safetensors.torch import save_file

from networks.flow_matching import add_noise, velocity_target
from networks.sd3 import PAPER_PROMPT, SD3TextEncoders, seeded

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny" / "forecast.yaml"
DEMO_DATA = REPO / "data" / "demo"
BIGEARTHNET = REPO.parent / "shared" / "data" / "bigearthnet-s2-examples"
BIGEARTHNET_RGB = ("B04", "B03", "B02")
REFLECTANCE_SCALE = 1e-4
KL_WEIGHT = 1e-6
SMALL_SIGMA_FRACTION = 0.5  # of the transformer's training draws: s in [0, 2 * strength] (the img2img range)


def backbone_args(config_path: Path = TINY_CONFIG) -> dict:
    """The tiny config's backbone init args: the architecture trained here is exactly the one the demo builds."""
    config = yaml.safe_load(config_path.read_text())
    return copy.deepcopy(config["model"]["init_args"]["backbone"]["init_args"])


def datamodule(cache_dir: str):
    """The demo's forecasting data with the tiny config's settings (its region split decides what is train);
    its validation manifest goes to ``cache_dir``, so the shipped data folder is never written."""
    from datamodules.s2_timeseries import S2ForecastDataModule

    return S2ForecastDataModule(
        str(DEMO_DATA),
        reflectance_scale=REFLECTANCE_SCALE,
        time_regex=r"t\d+",
        patch_size=64,
        embedding_pattern=None,
        batch_size=8,
        cache_dir=cache_dir,
    )


def read_reflectance(path: Path, bands: tuple[int, ...] = (1, 2, 3)) -> np.ndarray:
    with rasterio.open(path) as source:
        return np.clip(source.read(list(bands)).astype(np.float32) * REFLECTANCE_SCALE, 0.0, 1.0)


def training_frames(use_bigearthnet: bool = True) -> list[np.ndarray]:
    """Every frame (3, H, W) of the demo's training regions, plus the BigEarthNet RGB patches if present."""
    assignment = datamodule(tempfile.gettempdir())._assign_regions(
        sorted(p.name for p in DEMO_DATA.iterdir() if p.is_dir())
    )
    frames = [
        read_reflectance(path)
        for region in assignment["train"]
        for path in sorted((DEMO_DATA / region).glob("*.tif"))
    ]
    if use_bigearthnet and BIGEARTHNET.is_dir():
        for patch in sorted(p for p in BIGEARTHNET.iterdir() if p.is_dir()):
            bands = [
                read_reflectance(patch / f"{patch.name}_{band}.tif", (1,))[0] for band in BIGEARTHNET_RGB
            ]
            frames.append(np.stack(bands))
    return frames


def random_crops(frames: list[np.ndarray], count: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` random crops ``(count, 3, size, size)`` with random flips and quarter turns."""
    crops = []
    for _ in range(count):
        frame = frames[rng.integers(len(frames))]
        row = rng.integers(frame.shape[1] - size + 1)
        col = rng.integers(frame.shape[2] - size + 1)
        crop = np.rot90(frame[:, row : row + size, col : col + size], k=rng.integers(4), axes=(1, 2))
        crops.append(crop[:, :, ::-1] if rng.integers(2) else crop)
    return torch.from_numpy(np.ascontiguousarray(np.stack(crops)))


def cosine_lr(optimizer: torch.optim.Optimizer, step: int, total: int, peak: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = peak * 0.5 * (1 + np.cos(np.pi * step / max(total, 1)))


def train_vae(
    vae_config: dict, frames: list[np.ndarray], steps: int, seed: int, crop: int = 32, batch: int = 16
) -> AutoencoderKL:
    """L1 + MSE reconstruction on [-1, 1] images + ``KL_WEIGHT`` * KL, AdamW with cosine decay."""
    rng = np.random.default_rng(seed)
    with seeded(seed):
        vae = AutoencoderKL(**vae_config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for step in range(steps):
        cosine_lr(optimizer, step, steps, 2e-3)
        images = random_crops(frames, batch, crop, rng) * 2 - 1
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        decoded = vae.decode(latents).sample
        loss = (
            (decoded - images).abs().mean()
            + ((decoded - images) ** 2).mean()
            + KL_WEIGHT * posterior.kl().mean()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}/{steps} loss {loss.item():.5f} ({time.perf_counter() - started:.0f} s)")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_factors(vae: AutoencoderKL, crops: torch.Tensor) -> tuple[float, float]:
    """SD3's normalisation: shift = mean of the posterior means, scale = 1 / their std after the shift."""
    latents = vae.encode(crops * 2 - 1).latent_dist.mode()
    shift = latents.mean().item()
    return shift, 1.0 / (latents - shift).std().item()


@torch.no_grad()
def test_psnr(vae: AutoencoderKL) -> float:
    """Mean reconstruction PSNR (data range 1) of the demo's test windows, inputs and targets alike."""
    values = []
    with tempfile.TemporaryDirectory(prefix="satdiff_demo_manifest_") as cache_dir:
        data = datamodule(cache_dir)
        data.setup("test")
        batches = list(data.test_dataloader())
    for batch in batches:
        for images in (batch["image"][:, -1], batch["target"]):
            decoded = ((vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)
            mse = ((decoded - images) ** 2).flatten(1).mean(1)
            values.extend((-10 * torch.log10(mse)).tolist())
    return float(np.mean(values))


def train_transformer(
    transformer_config: dict,
    text_encoders: dict,
    latents: torch.Tensor,
    steps: int,
    seed: int,
    strength: float,
    batch: int = 16,
) -> SD3Transformer2DModel:
    """Rectified flow (v = eps - x0) on normalised VAE latents under the fixed prompt's embedding."""
    init = dict(text_encoders["init_args"])
    init["tokenizer_path"] = str(REPO / init["tokenizer_path"])
    prompt_tokens, prompt_pooled = SD3TextEncoders.from_config(**init).encode(PAPER_PROMPT, 77)
    with seeded(seed):
        transformer = SD3Transformer2DModel(**transformer_config)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for step in range(steps):
        cosine_lr(optimizer, step, steps, 1e-3)
        clean = latents[torch.randint(len(latents), (batch,), generator=generator)]
        noise = torch.randn(clean.shape, generator=generator)
        sigmas = torch.rand(batch, generator=generator)
        small = torch.rand(batch, generator=generator) < SMALL_SIGMA_FRACTION
        sigmas = torch.where(small, sigmas * min(1.0, 2 * strength), sigmas)
        velocity = transformer(
            hidden_states=add_noise(clean, noise, sigmas),
            encoder_hidden_states=prompt_tokens.expand(batch, -1, -1),
            pooled_projections=prompt_pooled.expand(batch, -1),
            timestep=sigmas * 1000,
            return_dict=False,
        )[0]
        loss = ((velocity - velocity_target(clean, noise)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(
                f"transformer step {step}/{steps} loss {loss.item():.5f} ({time.perf_counter() - started:.0f} s)"
            )
    return transformer.eval().requires_grad_(False)


def fine_tune(out: Path, shift: float, scale: float, epochs: int, lr: float, seed: int) -> Path:
    """Fit the tiny config with the new weights through the normal CLI; copy its best checkpoint to ``out``."""
    from lightning_cli.cli import main

    config = yaml.safe_load(TINY_CONFIG.read_text())
    backbone = config["model"]["init_args"]["backbone"]["init_args"]
    backbone["vae_weights"] = str(out / "vae.safetensors")
    backbone["transformer_weights"] = str(out / "transformer.safetensors")
    backbone["vae"].update(shift_factor=shift, scaling_factor=scale)
    # the paper's AdamW; its lr 1e-4 is the default of --fine-tune-lr
    config["model"]["init_args"]["optimizer"] = {
        "class_path": "torch.optim.AdamW",
        "init_args": {"lr": lr, "betas": [0.9, 0.999], "weight_decay": 0.04},
    }
    with tempfile.TemporaryDirectory(prefix="satdiff_demo_fit_") as run_dir:
        config_path = Path(run_dir) / "forecast.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cli = main(
            [
                "fit",
                "--config", str(config_path),
                "--seed_everything", str(seed),
                "--data.init_args.root", str(DEMO_DATA),
                "--data.init_args.cache_dir", run_dir,
                "--trainer.default_root_dir", run_dir,
                "--trainer.logger", "false",
                "--trainer.max_epochs", str(epochs),
                "--trainer.limit_train_batches", "null",
                "--trainer.limit_val_batches", "null",
            ]
        )  # fmt: skip
        checkpoint = out / "forecast.ckpt"
        portable_checkpoint(
            Path(cli.trainer.checkpoint_callback.best_model_path), checkpoint
        )  # on val regions
    return checkpoint


def portable_checkpoint(source: Path, target: Path) -> None:
    """Copy a checkpoint without what names this run's temporary folders: the checkpoint callbacks' state is
    dropped, and the saved hyperparameters name the shipped weights and demo data by repository-relative paths
    (as the tiny config does), so ``load_from_checkpoint`` works from the shipped copy."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)  # our own file, just written
    checkpoint.pop("callbacks", None)
    shipped = backbone_args()
    backbone = checkpoint["hyper_parameters"]["backbone"]["init_args"]
    for key in ("vae_weights", "transformer_weights"):
        backbone[key] = shipped[key]
    checkpoint["datamodule_hyper_parameters"].update(root="data/demo", cache_dir=None)
    torch.save(checkpoint, target)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "weights" / "tiny_sd3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--transformer-steps", type=int, default=800)
    parser.add_argument(
        "--latent-crops", type=int, default=2048, help="64 px crops encoded for the transformer"
    )
    parser.add_argument("--fine-tune-epochs", type=int, default=8, help="0 skips the Sat-JEPA-Diff fine-tune")
    parser.add_argument("--fine-tune-lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="2 is 7x slower on a busy 2-core machine")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    config = backbone_args()
    vae_config = {k: v for k, v in config["vae"].items() if k not in ("scaling_factor", "shift_factor")}
    frames = training_frames()
    vae = train_vae(vae_config, frames, args.vae_steps, args.seed)
    crops = random_crops(frames, args.latent_crops, 64, np.random.default_rng(args.seed + 1))
    shift, scale = latent_factors(vae, crops)
    figures = {"vae_test_psnr": test_psnr(vae), "shift_factor": shift, "scaling_factor": scale}
    print(
        f"vae: test-window reconstruction PSNR {figures['vae_test_psnr']:.2f} dB, shift {shift:.4f}, scale {scale:.4f}"
    )
    metadata = {"shift_factor": repr(shift), "scaling_factor": repr(scale), "seed": str(args.seed)}
    save_file(vae.state_dict(), args.out / "vae.safetensors", metadata=metadata)
    with torch.no_grad():
        latents = (vae.encode(crops * 2 - 1).latent_dist.mode() - shift) * scale
    strength = yaml.safe_load(TINY_CONFIG.read_text())["model"]["init_args"]["flow_matching"]["init_args"][
        "strength"
    ]
    transformer = train_transformer(
        config["transformer"], config["text_encoders"], latents, args.transformer_steps, args.seed, strength
    )
    save_file(
        transformer.state_dict(), args.out / "transformer.safetensors", metadata={"seed": str(args.seed)}
    )
    if args.fine_tune_epochs > 0:
        torch.use_deterministic_algorithms(
            False
        )  # Lightning's own ops are not all covered; seeds still fix it
        fine_tune(args.out, shift, scale, args.fine_tune_epochs, args.fine_tune_lr, args.seed)
    return figures


if __name__ == "__main__":
    main()
