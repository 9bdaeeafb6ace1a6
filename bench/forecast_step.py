"""Where does a Sat-JEPA-Diff training step go? FLOPs and time of each part of one step.

Parts (module paths in ``ForecastModule``): the LoRA transformer, VAE encode (target latents), VAE decode (the
SSIM term), I-JEPA (context encoder, predictor, projection head), the EMA target encoder and the adapter. The
trainable path is transformer + I-JEPA + adapter; VAE encode/decode and the EMA encoder are frozen work outside
it, whose share the SSIM options (``ssim_subset``, ``ssim_decode_bf16`` of ``ForecastModule``) reduce.

1. FLOPs at full size (``configs/bench/forecast_sd35m_random.yaml``, 24 layers, batch 8, 128 px), counted by
   torch's ``FlopCounterMode`` over forward + backward. The step runs on CPU with stand-ins for the transformer
   and VAE calls, which are then counted on the meta device with the step's input shapes (the 24-layer
   transformer is never allocated). From the total: the GPU throughput estimate (samples/s at 40% of a bf16
   H100's 989 TFLOP/s) that ``bench/s2_loader.py`` compares its loader against.
2. Time at real width with ``--time-layers`` of the 24 transformer layers (bf16 weights, 128 px): every op of
   a step is timed inside one run (a dispatch mode attributing each op's time to the parts it runs under,
   forward and backward), threads pinned, ``--repeats`` steps after a warm-up, medians per part.
3. ``--device cuda``: the full 24-layer step at batch 8 under bf16 autocast: median step time, MFU against the
   counted FLOPs, peak memory (no per-part timing on GPU: it would need a sync per op).

    python bench/forecast_step.py                               # FLOPs at full size + part times, CPU
    python bench/forecast_step.py --ssim-subset all --repeats 0   # FLOPs with the paper's SSIM on every sample
    python bench/forecast_step.py --device cuda                 # GPU: full step time, MFU, peak memory
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.module_tracker import ModuleTracker

import networks.sd3
from lightning_cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs" / "bench" / "forecast_sd35m_random.yaml"
H100_BF16_DENSE_FLOPS = 989e12
ASSUMED_MFU = 0.4
ROOT_NAME = "ForecastModule"
PARTS = {
    "transformer (LoRA)": ("backbone.transformer",),
    "VAE encode (target)": ("backbone.vae.encoder", "backbone.vae.quant_conv"),
    "VAE decode (SSIM term)": ("backbone.vae.decoder", "backbone.vae.post_quant_conv"),
    "I-JEPA enc+pred+head": ("encoder", "predictor", "projection_head"),
    "I-JEPA EMA target enc": ("target_encoder",),
    "adapter": ("adapter",),
}
FROZEN_PARTS = ("VAE encode (target)", "VAE decode (SSIM term)", "I-JEPA EMA target enc")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """CLI overrides: no logger, the sampler's steps, and the SSIM options when given."""
    overrides = [
        "--trainer.logger=false",
        "--trainer.accelerator=cpu",
        f"--model.init_args.flow_matching.init_args.num_steps={args.num_steps}",
    ]
    if args.ssim_subset is not None:
        subset = "null" if args.ssim_subset == "all" else args.ssim_subset
        overrides.append(f"--model.init_args.ssim_subset={subset}")
    if args.ssim_decode_bf16:
        overrides.append("--model.init_args.ssim_decode_bf16=true")
    return overrides


def build_module(args: argparse.Namespace, layers: int, transformer_device: str = "cpu") -> Any:
    """The benchmark config's ForecastModule with ``layers`` transformer layers (the first ones of the config),
    the transformer created on ``transformer_device`` (``meta``: shapes only, no weights)."""
    original = networks.sd3.SD3Transformer2DModel

    class BenchTransformer(original):
        def __init__(self, *init_args: Any, **init_kwargs: Any) -> None:
            init_kwargs["num_layers"] = layers
            with torch.device(transformer_device):
                super().__init__(*init_args, **init_kwargs)

    networks.sd3.SD3Transformer2DModel = BenchTransformer
    try:
        module = main(["--config", str(CONFIG), *config_overrides(args)], run=False).model
    finally:
        networks.sd3.SD3Transformer2DModel = original
    module.log = module.log_dict = lambda *a, **k: None  # no trainer attached
    return module


def synthetic_batch(batch_size: int, size: int, device: torch.device) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(batch_size, 1, 3, size, size, generator=generator).to(device)
    return {
        "image": image,
        "target": image[:, -1].roll(3, dims=-1),
        "mask": torch.ones(batch_size, size, size, dtype=torch.bool, device=device),
        "embedding": torch.randn(batch_size, 64, size, size, generator=generator).to(device),
        "has_embedding": torch.ones(batch_size, dtype=torch.bool, device=device),
    }


def own_part_inputs(module: Any) -> list[Any]:
    """Give each part float inputs of its own, so the module tracker sees where its backward ends.

    The tracker ends a module's backward when the gradients of its inputs are ready. A data input (the I-JEPA
    encoder's frame) never gets one, and an input shared with another consumer (the predictor's output, read by
    the adapter and the full-grid loss) gets it only after both; either way later backward ops would be counted
    under that part too. A free view of a grad-requiring input (the gradient still flows through it) or a new
    leaf for data gives each part its own; the leaf costs one input-gradient op (the patch embedding), negligible.
    """

    def own(x: Any) -> Any:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return x
        return x.view_as(x) if x.requires_grad else x.detach().requires_grad_()

    def hook(_: Any, args: tuple) -> tuple | None:
        return tuple(own(x) for x in args) if torch.is_grad_enabled() else None

    names = {path.split(".")[0] for paths in PARTS.values() for path in paths} - {"backbone"}
    return [getattr(module, name).register_forward_pre_hook(hook) for name in sorted(names)]


def name_modules(tracker: ModuleTracker, module: Any) -> None:
    """Name every submodule by its path under ``ROOT_NAME`` before the step.

    The tracker names a module by its class when it first sees it run; the step calls parts (``vae.encoder``...)
    but never the ForecastModule itself, so without this the names would depend on call order.
    """
    tracker._get_mod_name(module)


def training_step(module: Any, batch: dict[str, Tensor], autocast: bool = False) -> None:
    module.train()
    with torch.autocast(batch["image"].device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = module.training_step(batch, 0)
    loss.backward()


def flops_by_part(counts: dict[str, dict[Any, int]]) -> dict[str, int]:
    """Per part, the FLOPs counted under its module paths (forward and backward)."""
    total = {name: sum(ops.values()) for name, ops in counts.items()}
    return {part: sum(total.get(f"{ROOT_NAME}.{path}", 0) for path in paths) for part, paths in PARTS.items()}


def count_flops(args: argparse.Namespace) -> tuple[dict[str, int], int]:
    """FLOPs of one full-size training step per part, and in total (forward + backward).

    The step runs on CPU with stand-ins for the backbone's three heavy calls (transformer velocity, VAE encode,
    VAE decode): each records its inputs and returns a cheap tensor of the right shape, connected to every input
    that needs a gradient. The recorded calls are then replayed on the meta device through the real 24-layer
    transformer and the VAE, forward and, where the step back-propagates, backward.
    """
    module = build_module(args, layers=24, transformer_device="meta")
    backbone, vae = module.backbone, module.backbone.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    calls: list[tuple[str, tuple[Tensor, ...], bool]] = []

    def velocity(latents: Tensor, sigmas: Tensor, tokens: Tensor, pooled: Tensor) -> Tensor:
        calls.append(("velocity", (latents, sigmas, tokens, pooled), torch.is_grad_enabled()))
        return latents.float() + 0.0 * (tokens.float().mean() + pooled.float().mean())

    def encode(images: Tensor) -> Tensor:
        calls.append(("encode", (images,), torch.is_grad_enabled()))
        size = (
            images.shape[0],
            vae.config.latent_channels,
            images.shape[2] // factor,
            images.shape[3] // factor,
        )
        return images.new_zeros(size)

    def decode(latents: Tensor, autocast_dtype: torch.dtype | None = None) -> Tensor:
        calls.append(("decode", (latents,), torch.is_grad_enabled()))
        return latents[:, :3].float().repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)

    backbone.velocity, backbone.encode, backbone.decode = velocity, encode, decode
    hooks = own_part_inputs(module)
    step = FlopCounterMode(display=False, depth=None)
    name_modules(step.mod_tracker, module)
    with step:
        training_step(module, synthetic_batch(args.batch_size, args.size, torch.device("cpu")))
    del backbone.velocity, backbone.encode, backbone.decode
    for hook in hooks:
        hook.remove()

    backbone.to("meta")
    real_calls = {  # the VAE is called directly: autocast contexts (no FLOPs) do not exist on the meta device
        "velocity": backbone.velocity,
        "encode": lambda images: vae.encode(images * 2 - 1).latent_dist.mode(),
        "decode": lambda latents: vae.decode(latents).sample,
    }
    replay = FlopCounterMode(display=False, depth=None)
    name_modules(replay.mod_tracker, module)
    with replay:  # entered once: entering again would clear its counts
        for kind, inputs, grad_enabled in calls:
            meta = [
                torch.empty_like(x, device="meta").requires_grad_(grad_enabled and x.requires_grad)
                for x in inputs
            ]
            with torch.set_grad_enabled(grad_enabled):
                output = real_calls[kind](*meta)
                if output.requires_grad:
                    output.float().sum().backward()
    parts = flops_by_part(step.get_flop_counts())
    for part, flops in flops_by_part(replay.get_flop_counts()).items():
        parts[part] += flops
    return parts, step.get_total_flops() + replay.get_total_flops()


class PartTimer(TorchDispatchMode):
    """Seconds of every dispatched op, added to each module it runs under (forward and backward).

    CPU ops run synchronously, so an op's wall time is its cost; Python time between ops lands in no part.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tracker = ModuleTracker()
        self.seconds: dict[str, float] = defaultdict(float)

    def __enter__(self) -> PartTimer:
        self.tracker.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.tracker.__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        started = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - started
        for name in self.tracker.parents:
            self.seconds[name] += elapsed
        return out

    def by_part(self) -> dict[str, float]:
        return {
            part: sum(self.seconds.get(f"{ROOT_NAME}.{path}", 0.0) for path in paths)
            for part, paths in PARTS.items()
        }


def time_parts(args: argparse.Namespace) -> tuple[dict[str, float], float, float, float]:
    """Median seconds per part, per step, per optimizer step over ``--repeats`` CPU steps, and per forecast."""
    module = build_module(args, layers=args.time_layers)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    batch = synthetic_batch(args.time_batch_size, args.size, torch.device("cpu"))
    hooks = own_part_inputs(module)
    training_step(module, batch)  # warm-up
    part_runs: dict[str, list[float]] = defaultdict(list)
    steps, optimizer_steps = [], []
    for _ in range(args.repeats):
        optimizer.zero_grad(set_to_none=True)
        timer = PartTimer()
        name_modules(timer.tracker, module)
        started = time.perf_counter()
        with timer:
            training_step(module, batch)
        steps.append(time.perf_counter() - started)
        for part, seconds in timer.by_part().items():
            part_runs[part].append(seconds)
        started = time.perf_counter()
        optimizer.step()
        optimizer_steps.append(time.perf_counter() - started)
    for hook in hooks:
        hook.remove()
    medians = {part: statistics.median(runs) for part, runs in part_runs.items()}
    sampling = sampling_seconds(module, batch["image"][:1], args.repeats)
    return medians, statistics.median(steps), statistics.median(optimizer_steps), sampling


def sampling_seconds(module: Any, frame: Tensor, repeats: int, autocast: bool = False) -> float:
    """Median latency of one forecast (``flow_matching.num_steps`` transformer calls, VAE encode and decode)."""
    module.eval()

    def forecast() -> None:
        with torch.no_grad(), torch.autocast(frame.device.type, dtype=torch.bfloat16, enabled=autocast):
            module.forecast(frame)

    return median_seconds(forecast, repeats)


def median_seconds(fn: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after one warm-up (CUDA synchronised when in use)."""

    def synchronize() -> None:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()

    fn()
    synchronize()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        synchronize()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def gpu_step(args: argparse.Namespace, total_flops: int) -> None:
    """Full 24-layer step on the GPU (bf16 autocast): median time, MFU, peak memory."""
    device = torch.device(args.device)
    module = build_module(args, layers=24, transformer_device=args.device).to(device)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    batch = synthetic_batch(args.batch_size, args.size, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        training_step(module, batch, autocast=True)
        optimizer.step()

    torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(step, args.repeats)
    memory = torch.cuda.max_memory_allocated(device) / 2**30
    sampling = sampling_seconds(module, batch["image"][:1], args.repeats, autocast=True)
    print(
        f"GPU ({torch.cuda.get_device_name(device)}), 24 layers, batch {args.batch_size}: {seconds * 1000:.0f} ms "
        f"per step ({args.batch_size / seconds:.1f} samples/s), MFU {total_flops / seconds / H100_BF16_DENSE_FLOPS:.1%} "
        f"of {H100_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s, peak memory {memory:.1f} GiB"
    )
    print(
        f"sampling: {sampling * 1000:.0f} ms per {args.size} px frame ({module.flow_matching.num_steps} Euler steps)"
    )


def print_shares(title: str, values: dict[str, float], total: float, unit: Callable[[float], str]) -> None:
    print(title)
    for part, value in values.items():
        print(f"  {part:<24} {unit(value):>12}  {100 * value / total:5.1f}%")
    other = total - sum(values.values())
    # Negative when parts overlap: the module tracker can leave a part open while another one's backward runs.
    print(f"  {'rest (losses, glue)':<24} {unit(other):>12}  {100 * other / total:5.1f}%")
    frozen = sum(values[part] for part in FROZEN_PARTS)
    print(f"  outside the trainable path (VAE encode + decode, EMA encoder): {100 * frozen / total:.1f}%")


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)  # each figure shows as soon as it is measured
    torch.manual_seed(0)
    ssim = f"ssim_subset={args.ssim_subset or 'as configured'}, ssim_decode_bf16={args.ssim_decode_bf16}"
    print(f"config: {CONFIG.relative_to(REPO_ROOT)} ({ssim}), {args.size} px")
    parts, total = count_flops(args)
    print_shares(
        f"FLOPs per training step (forward + backward), 24 layers, batch {args.batch_size}: {total / 1e12:.2f} TFLOP",
        parts,
        total,
        lambda flops: f"{flops / 1e12:.3f} TFLOP",
    )
    estimate = ASSUMED_MFU * H100_BF16_DENSE_FLOPS / (total / args.batch_size)
    print(
        f"GPU throughput estimate: {estimate:.0f} samples/s ({total / args.batch_size / 1e12:.2f} TFLOP per "
        f"sample at {ASSUMED_MFU:.0%} of a bf16 H100's {H100_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s)"
    )
    if args.device.startswith("cuda"):
        gpu_step(args, total)
        return
    if args.repeats < 1:
        return
    seconds, step, optimizer_step, sampling = time_parts(args)
    print_shares(
        f"CPU time per training step ({args.threads} thread(s), {args.time_layers} of 24 layers, bf16 weights, batch "
        f"{args.time_batch_size}, median of {args.repeats}): {step * 1000:.0f} ms; optimizer step "
        f"{optimizer_step * 1000:.0f} ms",
        seconds,
        step,
        lambda s: f"{s * 1000:.0f} ms",
    )
    print(
        f"sampling on CPU ({args.time_layers} layers): {sampling * 1000:.0f} ms per {args.size} px frame "
        f"({args.num_steps} Euler steps)"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=8, help="batch of the FLOP count and the GPU step")
    parser.add_argument("--size", type=int, default=128, help="patch size in px")
    parser.add_argument("--time-layers", type=int, default=2, help="transformer layers of the CPU timing run")
    parser.add_argument("--time-batch-size", type=int, default=2, help="batch of the CPU timing run")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed steps after one warm-up (0: FLOPs only)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned)")
    parser.add_argument(
        "--ssim-subset",
        default=None,
        help="ForecastModule ssim_subset: N, or 'all' (the paper); default: config's",
    )
    parser.add_argument("--ssim-decode-bf16", action="store_true", help="ForecastModule ssim_decode_bf16")
    parser.add_argument("--num-steps", type=int, default=20, help="Euler steps of the sampling latency")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the full-size GPU step")
    return parser.parse_args()


if __name__ == "__main__":
    run(parse_args())
