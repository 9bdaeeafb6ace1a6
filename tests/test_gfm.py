"""SatDiFuser's comparison foundation models (networks.gfm): tiny random backbones of every family, the layers they
read, local weight files in the published layouts, band zero-filling in the datamodule, and one CLI fit + test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from datamodules.geobench import GeoBenchDataModule
from datamodules.synthetic.geobench import write_cashew_plant, write_eurosat
from lightning_cli.cli import main
from networks.gfm import (
    CROMAExtractor,
    DOFAExtractor,
    PyramidNeck,
    RemoteCLIPExtractor,
    SwinExtractor,
    TimmViTExtractor,
)
from networks.gfm.base import WEIGHTS_KEY

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
S2_13 = ["01", "blue", "green", "red", "05", "06", "07", "nir", "08A", "09", "10", "11", "12"]
TINY_VIT = dict(embed_dim=16, depth=4, num_heads=2, patch_size=8, image_size=32, layers=(0, 1, 2, 3))
TINY_CLIP = dict(
    width=16, depth=4, num_heads=2, patch_size=8, output_dim=8, image_size=32, layers=(0, 1, 2, 3)
)
TINY_CROMA = dict(encoder_dim=32, encoder_depth=4, image_size=32, layers=(0, 1, 2, 3))
TINY_SWIN = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2, image_size=32)


def unit(bands: int) -> dict:
    return {"mean": [0.0] * bands, "std": [1.0] * bands}


# family -> (builder of a tiny extractor with its keyword overrides, input bands)
FAMILIES = {
    "ssl4eo": (lambda **kw: TimmViTExtractor(in_chans=13, **unit(13), **{**TINY_VIT, **kw}), 13),
    "scalemae": (lambda **kw: TimmViTExtractor(in_chans=3, scale_mae_res=1.0, **unit(3), **{**TINY_VIT, **kw}), 3),
    "dofa": (lambda **kw: DOFAExtractor(wavelengths=[0.665, 0.56, 0.49], **unit(3), **{**TINY_VIT, **kw}), 3),
    "remoteclip": (lambda **kw: RemoteCLIPExtractor(**{**TINY_CLIP, **kw}), 3),
    "croma": (lambda **kw: CROMAExtractor(**unit(12), **{**TINY_CROMA, **kw}), 12),
    "satlas": (lambda **kw: SwinExtractor(in_chans=9, version="v2", **unit(9), **{**TINY_SWIN, **kw}), 9),
    "gfm": (lambda **kw: SwinExtractor(in_chans=3, version="v1", **unit(3), **{**TINY_SWIN, **kw}), 3),
}  # fmt: skip
SWINS = {"satlas", "gfm"}


def image(bands: int, size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(2, bands, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_gives_a_frozen_four_level_pyramid_and_the_neck_makes_it_a_pyramid(family):
    build, bands = FAMILIES[family]
    extractor = build()
    pyramid = extractor(image(bands))  # 40 px, resized to the model's 32 px
    assert extractor.num_timesteps == 1 and len(pyramid) == 4 and all(len(level) == 1 for level in pyramid)
    assert [[m.shape[1]] for (m,) in pyramid] == extractor.feature_channels
    if family in SWINS:  # the 4 stages: strides 4, 8, 16, 32, doubling widths, projected to one width
        stages = [(8, 8), (4, 4), (2, 2), (1, 1)]
        assert [tuple(m.shape[-2:]) for (m,) in pyramid] == stages
        assert extractor.feature_channels == [[8], [16], [32], [64]]
        neck, sizes = PyramidNeck(extractor.feature_channels, 1, scales=None, out_channels=12), stages
    else:  # one patch grid (32 px / patch 8), resampled 4x, 2x, 1x, 0.5x by the neck as PANGAEA's
        assert {tuple(m.shape[-2:]) for (m,) in pyramid} == {(4, 4)}
        neck = PyramidNeck(extractor.feature_channels, 1, scales=[4, 2, 1, 0.5])
        sizes = [(16, 16), (8, 8), (4, 4), (2, 2)]
    fused = neck(pyramid)
    assert [tuple(m.shape[-2:]) for m in fused] == sizes
    assert {m.shape[1] for m in fused} == {neck.out_channels}
    assert all(not p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not any(module.training for module in extractor.modules())
    # seeded random weights: the same extractor on every rebuild (fit and test of a tiny config)
    rebuilt = build()(image(bands))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(pyramid, rebuilt, strict=True))
    with pytest.raises(ValueError, match="bands"):
        extractor(image(bands + 1))


def test_neck_needs_a_common_width_for_swin_stages():
    with pytest.raises(ValueError, match="out_channels"):
        PyramidNeck([[8], [16], [32], [64]], 1)
    with pytest.raises(ValueError, match="power of two"):
        PyramidNeck([[8]] * 4, 1, scales=[3, 2, 1, 0.5])


def test_vit_blocks_read_are_the_backbones_own_intermediates():
    x = image(13, size=32)
    extractor = FAMILIES["ssl4eo"][0](layers=(0, 2, 3, 3))
    expected = extractor.backbone.forward_intermediates(
        x, indices=[0, 2, 3], intermediates_only=True, norm=False
    )
    maps = extractor.layer_maps(x)
    for got, want in zip(maps, [expected[0], expected[1], expected[2], expected[2]], strict=True):
        torch.testing.assert_close(got, want)

    clip = FAMILIES["remoteclip"][0](layers=(1, 1, 2, 3))
    x = image(3, size=32)
    ref = clip.backbone.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)[
        "image_intermediates"
    ]
    for got, want in zip(clip.layer_maps(x), [ref[0], ref[0], ref[1], ref[2]], strict=True):
        torch.testing.assert_close(got, want)


def test_croma_dofa_and_swin_last_layer_match_their_own_forward():
    croma = FAMILIES["croma"][0]()
    x = image(12, size=32)
    last = croma.layer_maps(x)[-1].flatten(2).transpose(1, 2)
    reference = croma.backbone(x_optical=x)["optical_encodings"]
    torch.testing.assert_close(croma.backbone.s2_encoder.transformer.norm_out(last), reference)

    dofa = FAMILIES["dofa"][0]()
    x = image(3, size=32)
    pooled = dofa.backbone.fc_norm(dofa.layer_maps(x)[-1].mean(dim=(-2, -1)))
    torch.testing.assert_close(pooled, dofa.backbone.forward_features(x, dofa.wavelengths))

    swin = FAMILIES["satlas"][0](layers=(0, 1, 2, 3))
    x = image(9, size=32)
    torch.testing.assert_close(swin.layer_maps(x)[-1], swin.backbone.features(x).permute(0, 3, 1, 2))
    assert FAMILIES["satlas"][0](layers=(1, 1, 2, 2)).feature_channels == [[16], [16], [32], [32]]


def torchvision_to_microsoft(state: dict) -> dict:
    """The inverse key mapping, to write a checkpoint as GFM's release (SimMIM ``encoder.``, ``model`` entry)."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^features\.0\.0\.", "patch_embed.proj.", key)
        key = re.sub(r"^features\.0\.2\.", "patch_embed.norm.", key)
        key = re.sub(
            r"^features\.(\d+)\.",
            lambda m: (
                f"layers.{(int(m[1]) - 1) // 2}.blocks."
                if int(m[1]) % 2
                else f"layers.{int(m[1]) // 2 - 1}.downsample."
            ),
            key,
        )
        key = key.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.3.", ".mlp.fc2.")
        out[f"encoder.{key}"] = value
    out["encoder.mask_token"] = torch.zeros(1, 1, 8)
    out["decoder.0.weight"] = torch.zeros(3)
    return {"model": out}


def published_layout(family: str, extractor: nn.Module) -> dict:
    state = extractor.backbone.state_dict()
    if family == "croma":
        return {"s2_encoder": extractor.backbone.s2_encoder.state_dict(), "s2_GAP_FFN": {}}
    if family == "remoteclip":  # the whole CLIP model: text tower entries beside visual.*
        return {**{f"visual.{k}": v for k, v in state.items()}, "text_projection": torch.zeros(8, 8)}
    if family == "gfm":
        return torchvision_to_microsoft(state)
    return {**state, "head.weight": torch.zeros(5, 16), "head.bias": torch.zeros(5)}  # an unused classifier


@pytest.mark.parametrize("family", FAMILIES)
def test_a_weight_file_in_the_published_layout_round_trips_through_weights_path(tmp_path, family):
    build, bands = FAMILIES[family]
    layout = {"checkpoint_layout": "microsoft"} if family == "gfm" else {}
    source = build(seed=1)
    path = tmp_path / "weights.pth"
    torch.save(published_layout(family, source), path)
    loaded = build(seed=0, weights_path=str(path), **layout)
    x = image(bands)
    for (want,), (got,) in zip(source(x), loaded(x), strict=True):
        torch.testing.assert_close(got, want)
    assert not torch.equal(
        build(seed=0)(x)[-1][0], source(x)[-1][0]
    )  # the file, not the seed, made them equal


def test_a_missing_or_mismatched_weight_file_names_the_key(tmp_path):
    build, _ = FAMILIES["ssl4eo"]
    with pytest.raises(FileNotFoundError, match=re.escape(WEIGHTS_KEY)):
        build(weights_path=str(tmp_path / "absent.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({**build().backbone.state_dict(), "blocks.9.extra": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match=r"unexpected \['blocks.9.extra'\]") as raised:
        build(weights_path=str(wrong))
    assert WEIGHTS_KEY in str(raised.value)


def test_bands_a_task_lacks_are_zero_filled_only_when_asked(tmp_path):
    root = tmp_path / "geobench"
    write_cashew_plant(root)  # Sentinel-2 without B10, as GEO-Bench's m-cashew-plant
    with pytest.raises(ValueError, match="'10'.*missing_bands"):
        GeoBenchDataModule("m-cashew-plant", str(root), bands=["red", "10"])
    zero = GeoBenchDataModule("m-cashew-plant", str(root), bands=["red", "10", "nir"], missing_bands="zero")
    plain = GeoBenchDataModule("m-cashew-plant", str(root), bands=["red", "nir"])
    assert zero.band_names == ["04 - Red", None, "08 - NIR"] and zero.dataset_key != plain.dataset_key
    zero.setup("fit")
    plain.setup("fit")
    filled, reference = zero.train_dataset[0]["image"], plain.train_dataset[0]["image"]
    assert filled.shape[0] == 3 and torch.equal(filled[1], torch.zeros_like(filled[1]))
    assert torch.equal(filled[[0, 2]], reference) and reference.abs().sum() > 0
    with pytest.raises(ValueError, match="none of the bands"):
        GeoBenchDataModule("m-cashew-plant", str(root), bands=["10"], missing_bands="zero")


OVERLAYS = ["satlas", "ssl4eo_mae", "ssl4eo_dino", "scalemae", "croma", "dofa", "gfm", "remoteclip"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_overlay_replaces_the_diffusion_extractor_and_points_at_a_local_file(name, capsys):
    # half on the segmentation base, half on the classification one (each parse costs seconds)
    bases = [("_base_seg", "m-cashew-plant"), ("_base_cls", "m-eurosat")]
    for base, task in [bases[OVERLAYS.index(name) % 2]]:
        configs = [
            CONFIGS / "difuser" / f"{base}.yaml",
            CONFIGS / "difuser" / f"{task}.yaml",
            CONFIGS / "gfm" / f"{name}.yaml",
        ]
        with pytest.raises(SystemExit) as parsed:
            main(["fit", *[a for c in configs for a in ("--config", str(c))], "--print_config"])
        assert parsed.value.code in (0, None)
        printed = capsys.readouterr().out
        extractor = printed.split("    extractor:\n", 1)[1].split("    fusion:\n", 1)[0]
        assert "networks.gfm." in extractor and "backbone" not in extractor and "timesteps" not in extractor
        assert "weights_path: checkpoints/" in extractor and "cache_dir: null" in printed
        assert "missing_bands: zero" in printed


@pytest.mark.parametrize(
    ("base", "overlay", "write_task", "metric"),
    [("difuser_seg.yaml", "ssl4eo_mae.yaml", write_cashew_plant, "test/miou"),
     ("difuser_cls.yaml", "satlas.yaml", write_eurosat, "test/accuracy")],
)  # fmt: skip
def test_cli_fit_and_test_of_a_tiny_overlay(tmp_path, base, overlay, write_task, metric):
    root = tmp_path / "geobench"
    write_task(root)
    args = [
        "--config", str(CONFIGS / "tiny" / base), "--config", str(CONFIGS / "tiny" / "gfm" / overlay),
        "--data.init_args.root", str(root), "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.logger", "false", "--trainer.max_epochs", "1",
    ]  # fmt: skip
    fit = main(["fit", *args])
    assert fit.trainer.callback_metrics["val/loss"].isfinite()
    assert all(p.grad is None and not p.requires_grad for p in fit.model.extractor.parameters())
    last = next((tmp_path / "run").rglob("last.ckpt"))
    assert not any(k.startswith("extractor.") for k in torch.load(last, weights_only=False)["state_dict"])
    test = main(["test", *args, "--ckpt_path", str(last)])  # rebuilds the same seeded extractor
    assert metric in test.trainer.callback_metrics
