"""Parameters and per-sample forward FLOPs of every backbone the two papers compare, at each one's paper input.

    python bench/backbone_flops.py [--out flops.csv]

Every model is built on the meta device (no weights, no memory) by name from torchgeo, timm, open_clip,
torchvision, diffusers or segmentation-models-pytorch, and one batch-1 forward is counted with torch's
``FlopCounterMode``: nothing runs at full size. Assumptions:

- FLOPs are torch's count: matrix multiplies, convolutions and attention (SDPA), 2 FLOPs per multiply-add;
  element-wise ops, norms and softmax are not counted. GFLOPs/sample = that count / 1e9 for one sample.
- Inputs (SatDiFuser's comparison models as configs/gfm/*.yaml configure them): Satlas Swin-V2-B, Sentinel-2
  multispectral (9 bands), 256 px, window 8; SSL4EO-S12 MAE and DINO ViT-S/16, 13 bands, 224 px; ScaleMAE ViT-L/16,
  RGB, 224 px; CROMA base, optical encoder only, 12 bands, 120 px; DOFA base/16, 13 bands with their wavelengths,
  224 px; GFM Swin-B, RGB, 192 px, window 6; RemoteCLIP ViT-B/32 image tower, 224 px. Supervised references at
  GEO-Bench sizes: ConvNeXt-B on m-bigearthnet (12 bands, 120 px), a ResNet-50 UNet on m-cashew-plant (13 bands,
  256 px). Frozen-backbone rows count the backbone's forward only (no probe head or neck); the supervised rows
  are whole networks.
- DiffusionSat: the SD 2.1 UNet (DiffusionSat's, without its metadata embeddings) at 256 px -> 32 x 32 x 4
  latents with a 77-token prompt; one SatDiFuser sample (configs/difuser/_base_seg.yaml) = the VAE encoder at
  256 px + one UNet pass per timestep of the DDIM inversion path (networks/difuser/extractor.py), the hooked
  passes at the selected timesteps included. The text encoder runs once per run (a fixed prompt): not counted.
- Sat-JEPA-Diff (configs/forecast.yaml, 128 px windows): one SD3.5 Medium transformer pass on 16 x 16 x 16
  latents with 154 prompt tokens (77 CLIP + 77 T5) + 64 adapter tokens; one forecast sample = the I-JEPA encoder
  and predictor, the adapter, the VAE encoder and decoder, and ``num_steps`` transformer passes. The I-JEPA
  ViT-B/8 at 128 px and Panopticon ViT-B/14 (the window resized to 224 px) are counted as encoders.
- The ratio column divides by one DiffusionSat UNet pass.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from any folder
    sys.path.insert(0, str(REPO_ROOT))

SD21_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
)
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
SD35_VAE = dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
S2_WAVELENGTHS_UM = (
    0.443,
    0.490,
    0.560,
    0.665,
    0.705,
    0.740,
    0.783,
    0.842,
    0.865,
    0.945,
    1.375,
    1.610,
    2.190,
)
PROMPT_TOKENS = 77


@dataclass(frozen=True)
class Count:
    params: int
    flops: int


@dataclass(frozen=True)
class Entry:
    model: str
    paper: str
    input: str
    count: Count


def count(
    build: Callable[[], nn.Module],
    inputs: Callable[[], tuple],
    call: str = "__call__",
    build_on_cpu: bool = False,
) -> Count:
    """Parameters and counted FLOPs of one forward of ``build()`` on ``inputs()``, on the meta device
    (``build_on_cpu``: a small model whose constructor reads tensor values is built on the CPU, then moved)."""
    with torch.device("cpu" if build_on_cpu else "meta"):
        model = build().eval()
    model = model.to("meta").requires_grad_(False)  # no autograd state for the counter's module hooks
    with torch.device("meta"):
        args = inputs()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        getattr(model, call)(*args)
    return Count(sum(p.numel() for p in model.parameters()), counter.get_total_flops())


def image(channels: int, size: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(1, channels, size, size),)


def combine(*parts: tuple[Count, int]) -> Count:
    """(count, passes) pairs -> parameters of the distinct parts, FLOPs of all passes."""
    return Count(sum(c.params for c, _ in parts), sum(c.flops * n for c, n in parts))


# ------------------------------------------------------------------------------------------------ SatDiFuser's
def satdifuser_entries() -> list[Entry]:
    import timm
    import torchvision
    from open_clip.transformer import VisionTransformer as OpenClipViT
    from segmentation_models_pytorch import Unet
    from torchgeo.models import croma_base, dofa_base_patch16_224, scalemae_large_patch16
    from torchvision.models.swin_transformer import SwinTransformer

    def timm_vit(name: str, channels: int) -> Count:
        return count(
            lambda: timm.create_model(name, pretrained=False, in_chans=channels), image(channels, 224)
        )

    def dofa() -> Count:
        wavelengths = list(S2_WAVELENGTHS_UM)
        return count(
            lambda: dofa_base_patch16_224(weights=None),
            lambda: (torch.randn(1, 13, 224, 224), wavelengths),
            call="forward_features",
        )

    def croma() -> Count:
        return count(
            lambda: croma_base(weights=None, modalities=["optical"], image_size=120),
            lambda: (None, torch.randn(1, 12, 120, 120)),
        )

    def gfm_swin_b() -> Count:
        return count(
            lambda: (
                SwinTransformer(
                    patch_size=[4, 4],
                    embed_dim=128,
                    depths=[2, 2, 18, 2],
                    num_heads=[4, 8, 16, 32],
                    window_size=[6, 6],
                    stochastic_depth_prob=0.0,
                ).features
            ),
            image(3, 192),
        )

    def satlas_swin_v2_b() -> Count:
        def build() -> nn.Module:
            model = torchvision.models.swin_v2_b(weights=None)
            old = model.features[0][0]
            model.features[0][0] = nn.Conv2d(9, old.out_channels, old.kernel_size, old.stride)
            return model.features

        return count(build, image(9, 256))

    def remoteclip() -> Count:
        return count(
            lambda: OpenClipViT(
                image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_ratio=4.0, output_dim=512
            ),
            image(3, 224),
        )

    def scalemae() -> Count:
        return count(lambda: scalemae_large_patch16(weights=None), image(3, 224), call="forward_features")

    return [
        Entry("Satlas Swin-V2-B (S2 MS)", "SatDiFuser", "9 x 256 x 256", satlas_swin_v2_b()),
        Entry(
            "SSL4EO-S12 MAE ViT-S/16", "SatDiFuser", "13 x 224 x 224", timm_vit("vit_small_patch16_224", 13)
        ),
        Entry(
            "SSL4EO-S12 DINO ViT-S/16", "SatDiFuser", "13 x 224 x 224", timm_vit("vit_small_patch16_224", 13)
        ),
        Entry("ScaleMAE ViT-L/16", "SatDiFuser", "3 x 224 x 224", scalemae()),
        Entry("CROMA base (optical)", "SatDiFuser", "12 x 120 x 120", croma()),
        Entry("DOFA ViT-B/16", "SatDiFuser", "13 x 224 x 224", dofa()),
        Entry("GFM Swin-B", "SatDiFuser", "3 x 192 x 192", gfm_swin_b()),
        Entry("RemoteCLIP ViT-B/32", "SatDiFuser", "3 x 224 x 224", remoteclip()),
        Entry(
            "Supervised ConvNeXt-B",
            "SatDiFuser",
            "12 x 120 x 120",
            count(lambda: timm.create_model("convnext_base", pretrained=False, in_chans=12), image(12, 120)),
        ),
        Entry(
            "Supervised UNet (ResNet-50)",
            "SatDiFuser",
            "13 x 256 x 256",
            count(lambda: Unet("resnet50", encoder_weights=None, in_channels=13, classes=2), image(13, 256)),
        ),
    ]


def diffusionsat_entries() -> tuple[Entry, Entry]:
    """One DiffusionSat UNet pass, and one SatDiFuser sample (VAE encoder + every UNet pass of the inversion)."""
    import yaml
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from networks.difuser.extractor import inversion_path

    extractor = yaml.safe_load((REPO_ROOT / "configs/difuser/_base_seg.yaml").read_text())["model"][
        "init_args"
    ]
    settings = extractor["extractor"]["init_args"]
    passes = len(inversion_path(settings["timesteps"], settings["num_inversion_steps"], 1000))
    unet = count(
        lambda: UNet2DConditionModel(**SD21_UNET),
        lambda: (torch.randn(1, 4, 32, 32), torch.tensor([100]), torch.randn(1, PROMPT_TOKENS, 1024)),
    )
    vae_encoder = count(lambda: AutoencoderKL(**SD_VAE), image(3, 256), call="encode")
    return (
        Entry("DiffusionSat UNet (SD 2.1), 1 pass", "SatDiFuser", "4 x 32 x 32 latent", unet),
        Entry(
            f"SatDiFuser sample: VAE enc + {passes} UNet passes",
            "SatDiFuser",
            "3 x 256 x 256",
            combine((vae_encoder, 1), (unet, passes)),
        ),
    )


# ------------------------------------------------------------------------------------------------ Sat-JEPA-Diff's
def satjepadiff_entries() -> list[Entry]:
    import yaml
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from networks.adapter import ConditioningAdapter
    from networks.ijepa import IJEPAEncoder, IJEPAPredictor

    model = yaml.safe_load((REPO_ROOT / "configs/forecast.yaml").read_text())["model"]["init_args"]
    window = yaml.safe_load((REPO_ROOT / "configs/forecast.yaml").read_text())["data"]["init_args"][
        "patch_size"
    ]
    adapter_args = model["adapter"]["init_args"]
    adapter_tokens = (adapter_args["coarse_size"] // adapter_args["coarse_patch"]) ** 2
    latent = window // 8
    context = 2 * PROMPT_TOKENS + adapter_tokens
    transformer = count(
        lambda: SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER),
        lambda: (
            torch.randn(1, 16, latent, latent),
            torch.randn(1, context, 4096),
            torch.randn(1, 2048),
            torch.tensor([350.0]),
        ),
    )
    encoder = count(lambda: IJEPAEncoder(img_size=window, **model["encoder"]["init_args"]), image(3, window))
    grid = model["predictor"]["init_args"]["grid_size"]
    predictor = count(
        lambda: IJEPAPredictor(**model["predictor"]["init_args"]),
        lambda: (torch.randn(1, grid**2, model["encoder"]["init_args"]["embed_dim"]),),
        build_on_cpu=True,
    )
    adapter = count(
        lambda: ConditioningAdapter(**adapter_args).eval(),
        lambda: (torch.randn(1, grid**2, adapter_args["semantic_dim"]), torch.randn(1, 3, window, window)),
    )
    vae_encoder = count(lambda: AutoencoderKL(**SD35_VAE), image(3, window), call="encode")
    vae_decoder = count(
        lambda: AutoencoderKL(**SD35_VAE), lambda: (torch.randn(1, 16, latent, latent),), "decode"
    )
    steps = model["flow_matching"]["init_args"]["num_steps"]
    panopticon = count(lambda: meta_ready_panopticon(window), image(3, window))
    return [
        Entry(
            "SD3.5 Medium transformer, 1 pass",
            "Sat-JEPA-Diff",
            f"16 x {latent} x {latent} latent",
            transformer,
        ),
        Entry(f"I-JEPA encoder ViT-B/8 ({window} px)", "Sat-JEPA-Diff", f"3 x {window} x {window}", encoder),
        Entry("I-JEPA predictor", "Sat-JEPA-Diff", f"{grid**2} tokens", predictor),
        Entry(
            "Panopticon ViT-B/14 (resized to 224)", "Sat-JEPA-Diff", f"3 x {window} x {window}", panopticon
        ),
        Entry(
            f"Sat-JEPA-Diff sample: {steps} transformer passes + rest",
            "Sat-JEPA-Diff",
            f"3 x {window} x {window}",
            combine(
                (encoder, 1),
                (predictor, 1),
                (adapter, 1),
                (vae_encoder, 1),
                (vae_decoder, 1),
                (transformer, steps),
            ),
        ),
    ]


class ConstantChannelEmbedding(nn.Module):
    """Stands in for Panopticon's channel-id embedding (sin-cos of the wavelengths, selected with boolean masks,
    which the meta device cannot evaluate): the same shape, no matrix multiply, so the count is unchanged."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, chn_ids: torch.Tensor) -> torch.Tensor:
        return chn_ids.new_zeros(*chn_ids.shape, self.dim)


def meta_ready_panopticon(window: int) -> nn.Module:
    from networks.panopticon import PanopticonEncoder

    encoder = PanopticonEncoder(img_size=window)
    channel_attention = encoder.vit.patch_embed.chnfus
    channel_attention.chnemb = ConstantChannelEmbedding(channel_attention.query.shape[-1])
    return encoder


def table(entries: list[Entry], reference: Count) -> list[dict[str, str]]:
    return [
        {
            "model": entry.model,
            "paper": entry.paper,
            "input": entry.input,
            "params_M": f"{entry.count.params / 1e6:.1f}",
            "GFLOPs_per_sample": f"{entry.count.flops / 1e9:.2f}",
            "ratio_to_DiffusionSat_UNet_pass": f"{entry.count.flops / reference.flops:.3f}",
        }
        for entry in entries
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table as CSV here")
    args = parser.parse_args(argv)
    unet, satdifuser_sample = diffusionsat_entries()
    entries = [unet, satdifuser_sample, *satdifuser_entries(), *satjepadiff_entries()]
    rows = table(entries, unet.count)
    widths = {key: max(len(key), *(len(row[key]) for row in rows)) for key in rows[0]}
    print("  ".join(key.ljust(width) for key, width in widths.items()))
    for row in rows:
        print("  ".join(row[key].ljust(width) for key, width in widths.items()))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
