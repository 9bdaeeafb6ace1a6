"""SatDiFuser frozen extractor: hooked decoder maps, DDIM inversion, frozen parts, missing weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDIMScheduler

from networks.difuser.extractor import (
    DiffusionFeatureExtractor,
    PretrainedDiffusionBackbone,
    RandomDiffusionBackbone,
    byte_level_clip_tokenizer,
    ddim_step,
    inversion_path,
)

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "difuser_cls.yaml"


def tiny_backbone_config() -> dict:
    """The tiny backbone of configs/tiny/difuser_cls.yaml (one definition for configs and tests)."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    return copy.deepcopy(config["model"]["init_args"]["extractor"]["init_args"]["backbone"]["init_args"])


def tiny_extractor(
    prediction_type: str = "v_prediction", seed: int = 0, **kwargs
) -> DiffusionFeatureExtractor:
    config = tiny_backbone_config()
    config["scheduler"]["prediction_type"] = prediction_type
    config["seed"] = seed
    kwargs.setdefault("num_inversion_steps", 10)
    kwargs.setdefault("image_size", 32)
    return DiffusionFeatureExtractor(RandomDiffusionBackbone(**config), **kwargs)


def images(batch: int = 2, bands: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, bands, size, size, generator=torch.Generator().manual_seed(seed))


def test_hooks_capture_every_decoder_map_per_level_with_its_shape():
    extractor = tiny_extractor(timesteps=[1, 100, 200])
    pyramid = extractor(images())
    # Tiny UNet (layers_per_block 1): each up block has 2 ResNets; the 3 finer ones also 2 self-attentions.
    # Latent 16x16 (32 px, VAE factor 2); up-block widths are the reversed block_out_channels (64, 64, 64, 32).
    expected_blocks = [4, 4, 4, 2]
    expected_size = [16, 8, 4, 2]
    expected_width = [32, 64, 64, 64]
    assert len(pyramid) == 4
    for level, maps in enumerate(pyramid):
        assert len(maps) == 3 * expected_blocks[level]
        for tensor, channels in zip(maps, extractor.feature_channels[level], strict=True):
            assert tensor.shape == (2, expected_width[level], expected_size[level], expected_size[level])
            assert tensor.shape[1] == channels
            assert torch.isfinite(tensor).all()
    assert extractor.num_timesteps == 3
    # timestep-major: the same block at different timesteps differs (different noisy latents)
    assert not torch.allclose(pyramid[0][0], pyramid[0][4])


def test_block_types_select_resnet_or_attention_maps():
    resnet_only = tiny_extractor(timesteps=[1, 100], block_types=["resnet_residual"])
    assert [len(c) for c in resnet_only.feature_channels] == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="no decoder map at pyramid level"):
        tiny_extractor(block_types=["attn"])  # the coarsest up block has no attention


def test_attention_maps_are_reshaped_to_the_spatial_layout():
    """The attn1 map at a pixel must come from that pixel's token: a shifted input shifts the map."""
    extractor = tiny_extractor(timesteps=[1], block_types=["resnet_residual", "attn"])
    captured = {}
    attn1 = extractor.unet.up_blocks[3].attentions[0].transformer_blocks[0].attn1
    handle = attn1.register_forward_hook(lambda m, a, out: captured.setdefault("tokens", out))
    pyramid = extractor(images(batch=1))
    handle.remove()
    tokens = captured["tokens"]  # (B, h*w, C), row-major over (h, w)
    attention_map = pyramid[0][1]  # level 0: resnet 0, attn 0, resnet 1, attn 1
    assert torch.equal(attention_map[0, :, 2, 5], tokens[0, 2 * 16 + 5])


def test_inversion_path_holds_the_grid_and_every_selected_timestep():
    assert inversion_path([1, 100, 200], 10, 1000) == [0, 1, 100, 200]
    assert inversion_path([1, 100, 200], 50, 1000) == [0, 1, *range(20, 201, 20)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_inversion_then_sampling_reconstructs_the_latent(prediction_type):
    """Invert unit-scale latents (like SD's scaled latents) to t=200 and sample back with diffusers'
    DDIMScheduler of the same prediction type; sampling under the other prediction type must fail to reconstruct,
    so an inversion that treated v as eps would be caught."""
    steps = 100
    extractor = tiny_extractor(prediction_type, timesteps=[200], num_inversion_steps=steps)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        noisy = extractor.invert(latents)[200]

        def sample_back(assumed_type: str) -> torch.Tensor:
            scheduler_config = {
                **tiny_backbone_config()["scheduler"],
                "steps_offset": 0,
                "set_alpha_to_one": True,
            }
            scheduler = DDIMScheduler(**{**scheduler_config, "prediction_type": assumed_type})
            scheduler.set_timesteps(steps)
            sample = noisy
            for timestep in scheduler.timesteps[scheduler.timesteps <= 200]:
                output = extractor.predict(sample, int(timestep))
                sample = scheduler.step(output, timestep, sample).prev_sample
            return sample

        error = (sample_back(prediction_type) - latents).abs().mean()
        other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
        wrong_error = (sample_back(other) - latents).abs().mean()
    assert (noisy - latents).abs().mean() > 0.1  # the latent really was noised
    assert error < 0.02
    assert wrong_error > 5 * error


def test_ddim_step_matches_diffusers_for_both_prediction_types():
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = DDIMScheduler(
            **{**tiny_backbone_config()["scheduler"], "prediction_type": prediction_type}
        )
        scheduler.set_timesteps(50)  # steps_offset 1: 981 -> 961 -> ...
        expected = scheduler.step(output, 981, sample).prev_sample
        alphas = scheduler.alphas_cumprod
        assert torch.allclose(
            ddim_step(sample, output, alphas[981], alphas[961], prediction_type), expected, atol=1e-5
        )


def test_extractor_is_frozen_in_eval_mode_without_grad():
    extractor = tiny_extractor()
    parent = torch.nn.ModuleDict({"extractor": extractor, "trainable": torch.nn.Linear(2, 2)})
    parent.train()
    assert not extractor.training and not extractor.unet.training and not extractor.vae.training
    assert all(not p.requires_grad for p in extractor.parameters())
    pyramid = extractor(images())
    assert all(not m.requires_grad for level in pyramid for m in level)
    # the prompt embedding is kept (non-persistent), the text encoder is not
    assert not hasattr(extractor, "text_encoder") and extractor.prompt_embeds.shape[0] == 1
    assert not any(key.startswith(("prompt", "alphas")) for key in extractor.state_dict())


def test_bad_band_count_and_range_are_named():
    extractor = tiny_extractor()
    with pytest.raises(ValueError, match="needs 3 \\(RGB\\) bands but the images have 5"):
        extractor(images(bands=5))
    with pytest.raises(ValueError, match="images in \\[0, 1\\]"):
        extractor(images() * 10 - 5)
    # rgb_bands picks the RGB channels out of a multi-band image
    selecting = tiny_extractor(rgb_bands=[3, 2, 1])
    many = images(bands=5)
    assert torch.equal(selecting(many)[3][0], extractor(many[:, [3, 2, 1]])[3][0])


def test_cache_identity_follows_config_and_weights():
    base = tiny_extractor()
    assert base.cache_identity == tiny_extractor().cache_identity
    assert base.cache_identity != tiny_extractor(timesteps=[1, 100]).cache_identity
    assert base.cache_identity != tiny_extractor(block_types=["resnet_residual"]).cache_identity
    assert base.cache_identity != tiny_extractor(seed=1).cache_identity


def test_missing_weights_folder_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone.init_args.root"):
        PretrainedDiffusionBackbone(str(tmp_path / "absent"))
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="backbone.init_args.vae_subfolder"):
        PretrainedDiffusionBackbone(str(tmp_path))


def test_pretrained_backbone_loads_a_local_diffusers_folder(tmp_path):
    """The same classes saved to disk (DiffusionSat layout: UNet under checkpoint-150000/unet) load offline."""
    parts = RandomDiffusionBackbone(**tiny_backbone_config()).load()
    parts.unet.save_pretrained(tmp_path / "checkpoint-150000" / "unet")
    parts.vae.save_pretrained(tmp_path / "vae")
    parts.text_encoder.save_pretrained(tmp_path / "text_encoder")
    parts.tokenizer.save_pretrained(tmp_path / "tokenizer")
    parts.scheduler.save_pretrained(tmp_path / "scheduler")
    backbone = PretrainedDiffusionBackbone(str(tmp_path), unet_subfolder="checkpoint-150000/unet")
    loaded = DiffusionFeatureExtractor(backbone, num_inversion_steps=10, image_size=32)
    reference = DiffusionFeatureExtractor(
        RandomDiffusionBackbone(**tiny_backbone_config()), num_inversion_steps=10, image_size=32
    )
    batch = images()
    assert torch.allclose(loaded(batch)[0][0], reference(batch)[0][0], atol=1e-5)
    identity = loaded.cache_identity
    (tmp_path / "vae" / "config.json").write_text((tmp_path / "vae" / "config.json").read_text() + " ")
    assert (
        DiffusionFeatureExtractor(backbone, num_inversion_steps=10, image_size=32).cache_identity != identity
    )


def test_generated_tokenizer_round_trips_the_prompt():
    tokenizer = byte_level_clip_tokenizer(32)
    ids = tokenizer("A satellite image").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 2 + len("Asatelliteimage")  # byte-level, no merges: one token per character
    assert (
        tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "asatelliteimage"
    )  # CLIP lowercases


def count_unet_calls(extractor: DiffusionFeatureExtractor) -> list[int]:
    """Batch sizes of every UNet call from now on."""
    calls: list[int] = []
    extractor.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


def test_inversion_calls_the_unet_once_per_visited_timestep():
    """50 steps to t=200 visit 0, 1, 20, ..., 200: 12 UNet calls (the clean latent is the sample at t=0)."""
    extractor = tiny_extractor(timesteps=[1, 100, 200], num_inversion_steps=50)
    calls = count_unet_calls(extractor)
    extractor(images(batch=1))
    assert len(extractor.path) == 12 and len(calls) == 12


def test_latent_tier_reads_the_same_pyramid_in_one_batched_call():
    extractor = tiny_extractor(timesteps=[1, 100, 200])
    batch = images(batch=2)
    expected = extractor(batch)
    noisy = extractor.noisy_latents(batch)
    assert noisy.shape == (2, 3, 4, 16, 16)
    calls = count_unet_calls(extractor)
    pyramid = extractor.features_from_latents(noisy)
    assert calls == [6]  # 3 timesteps x 2 samples, one call
    for level_expected, level in zip(expected, pyramid, strict=True):
        for e, m in zip(level_expected, level, strict=True):
            torch.testing.assert_close(m, e, atol=1e-4, rtol=1e-4)


def test_resnet_block_types_read_the_residual_branch_or_the_whole_block():
    extractor = tiny_extractor(timesteps=[1], block_types=["resnet_residual", "resnet_output"])
    assert DiffusionFeatureExtractor.__init__.__defaults__[1] == ["resnet_residual", "attn"]  # the paper's
    resnet = extractor.unet.up_blocks[3].resnets[0]
    seen = {}
    resnet.conv2.register_forward_hook(lambda m, a, out: seen.setdefault("conv2", out))
    resnet.register_forward_hook(lambda m, a, out: seen.setdefault("block", out))
    pyramid = extractor(images(batch=1))
    assert extractor.block_layout[0][:2] == [("resnet_residual", 0), ("resnet_output", 0)]
    torch.testing.assert_close(pyramid[0][0], seen["conv2"])
    torch.testing.assert_close(pyramid[0][1], seen["block"])
    assert not torch.allclose(seen["conv2"], seen["block"])  # the shortcut of the concatenated skip differs


def test_shrinking_to_the_backbone_size_is_antialiased():
    extractor = tiny_extractor(image_size=32)
    seen = {}
    extractor.vae.encoder.register_forward_pre_hook(lambda m, args: seen.setdefault("input", args[0]))
    stripes = torch.zeros(1, 3, 64, 64)
    stripes[..., ::2] = 1.0  # a pattern above the 32 px Nyquist limit
    extractor(stripes)
    expected = F.interpolate(stripes, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(seen["input"], expected * 2 - 1)


def test_bfloat16_compute_runs_the_unet_in_bf16_and_keeps_features_close():
    reference = tiny_extractor(timesteps=[1, 200])
    extractor = tiny_extractor(timesteps=[1, 200], compute_dtype="bfloat16")
    assert extractor.cache_identity != reference.cache_identity
    dtypes = []
    extractor.unet.conv_in.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    batch = images(batch=2)
    pyramid, expected = extractor(batch), reference(batch)
    assert set(dtypes) == {torch.bfloat16}
    for level, level_expected in zip(pyramid, expected, strict=True):
        for m, e in zip(level, level_expected, strict=True):
            assert m.dtype == torch.float32 and torch.isfinite(m).all()
            assert F.cosine_similarity(m.flatten(), e.flatten(), dim=0) > 0.98
