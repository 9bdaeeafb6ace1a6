"""SD3 parts (frozen transformer + LoRA, VAE, prompt embedding) and the flow-matching sampler, at tiny size."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, SD3Transformer2DModel

from networks.flow_matching import FlowMatching, add_noise, clean_estimate, velocity_target
from networks.sd3 import SD3Backbone, SD3TextEncoders, seeded

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "forecast.yaml"


def tiny_backbone_args(trained: bool = False) -> dict:
    """The backbone init args of configs/tiny/forecast.yaml (tests use exactly what the tiny run uses); without
    ``trained``, the seeded random build (no ``*_weights``; the trained ones: tests/test_demo_weights.py)."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    args = copy.deepcopy(config["model"]["init_args"]["backbone"]["init_args"])
    if not trained:
        args.pop("vae_weights", None)
        args.pop("transformer_weights", None)
    return args


def tiny_text_encoders(args: dict) -> SD3TextEncoders:
    init = dict(args["text_encoders"]["init_args"])
    init["tokenizer_path"] = str(TINY_CONFIG.parents[2] / init["tokenizer_path"])
    return SD3TextEncoders.from_config(**init)


def build_tiny_backbone(trained: bool = False, **overrides) -> SD3Backbone:
    args = tiny_backbone_args(trained)
    args["text_encoders"] = tiny_text_encoders(args)
    args.update(overrides)
    return SD3Backbone.from_config(**args)


@pytest.fixture(scope="module")
def backbone() -> SD3Backbone:
    return build_tiny_backbone()


def adapter_conditioning(backbone: SD3Backbone, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randn(batch, 64, backbone.joint_dim)
    pooled = torch.randn(batch, backbone.pooled_dim)
    return backbone.conditioning(tokens, pooled)


def test_only_lora_requires_grad(backbone):
    trainable = {name for name, param in backbone.named_parameters() if param.requires_grad}
    assert trainable, "LoRA weights must be trainable"
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert not any(param.requires_grad for param in backbone.vae.parameters())
    targeted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert targeted == {"to_q", "to_k", "to_v", "0"}  # to_out.0 ends in "0"


def test_context_projection_lora_is_an_option():
    backbone = build_tiny_backbone(lora_context_projections=True)
    trainable = [name for name, param in backbone.named_parameters() if param.requires_grad]
    for projection in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        assert any(f".{projection}.lora_A." in name for name in trainable), projection


def test_lora_rank_and_alpha_follow_config(backbone):
    layer = backbone.transformer.transformer_blocks[0].attn.to_q
    assert layer.r["default"] == 8
    assert layer.scaling["default"] == pytest.approx(16 / 8)


def test_prompt_encoders_run_once_and_are_released():
    args = tiny_backbone_args()
    encoders = tiny_text_encoders(args)
    calls = {"clip_l": 0, "clip_g": 0, "t5": 0}
    for name in calls:

        def count(*_, name=name):
            calls[name] += 1

        getattr(encoders, name).register_forward_hook(count)
    args["text_encoders"] = encoders
    backbone = SD3Backbone.from_config(**args)
    assert calls == {"clip_l": 1, "clip_g": 1, "t5": 1}
    assert encoders.clip_l is None and encoders.clip_g is None and encoders.t5 is None
    assert sum(1 for _ in encoders.parameters()) == 0
    assert not any("clip" in name or "t5" in name for name, _ in backbone.named_parameters())
    with pytest.raises(RuntimeError, match="released"):
        encoders.encode("again", 77)
    # 77 CLIP tokens + 77 T5 tokens at the T5 width; pooled = CLIP-L + CLIP-G projections
    assert backbone.prompt_tokens.shape == (1, 154, backbone.joint_dim)
    assert backbone.prompt_pooled.shape == (1, backbone.pooled_dim)
    assert backbone.prompt_tokens.abs().sum() > 0


def test_seeded_rebuild_has_identical_frozen_weights(backbone):
    rebuilt = build_tiny_backbone()
    for (name, expected), (_, actual) in zip(
        backbone.state_dict().items(), rebuilt.state_dict().items(), strict=True
    ):
        if "lora_" not in name:
            assert torch.equal(expected, actual), name
    other_seed = build_tiny_backbone(seed=1)
    assert not torch.equal(other_seed.vae.encoder.conv_in.weight, backbone.vae.encoder.conv_in.weight)


def test_conditioning_appends_adapter_tokens_and_averages_pooled(backbone):
    tokens = torch.randn(2, 64, backbone.joint_dim)
    pooled = torch.randn(2, backbone.pooled_dim)
    joint, joint_pooled = backbone.conditioning(tokens, pooled)
    assert joint.shape == (2, 154 + 64, backbone.joint_dim)
    assert torch.equal(joint[:, 154:], tokens)
    assert torch.allclose(joint_pooled, (backbone.prompt_pooled + pooled) / 2)


def test_vae_round_trip_shapes_and_decoder_gradient(backbone):
    images = torch.rand(2, 3, 64, 64)
    latents = backbone.encode(images)
    assert latents.shape == (2, backbone.latent_channels, 16, 16) and latents.dtype == torch.float32
    latents.requires_grad_(True)
    backbone.decode(latents).mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_velocity_gradient_reaches_lora_and_conditioning_only(backbone):
    backbone.zero_grad()
    latents = backbone.encode(torch.rand(2, 3, 64, 64))
    tokens = torch.randn(2, 64, backbone.joint_dim, requires_grad=True)
    pooled = torch.randn(2, backbone.pooled_dim, requires_grad=True)
    joint, joint_pooled = backbone.conditioning(tokens, pooled)
    velocity = backbone.velocity(latents, torch.rand(2), joint, joint_pooled)
    assert velocity.shape == latents.shape
    velocity.square().mean().backward()
    assert tokens.grad.abs().sum() > 0 and pooled.grad.abs().sum() > 0
    lora_b = [p for n, p in backbone.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None for p in lora_b)
    assert all(p.grad is None for n, p in backbone.named_parameters() if "lora_" not in n)
    backbone.zero_grad()


def test_sampler_calls_transformer_num_steps_times(backbone):
    calls = []
    handle = backbone.transformer.register_forward_hook(lambda *_: calls.append(1))
    start = backbone.encode(torch.rand(1, 3, 64, 64))
    joint, pooled = adapter_conditioning(backbone, 1)

    def velocity(latents, sigmas):
        return backbone.velocity(latents, sigmas, joint, pooled)

    try:
        for steps in (1, 3):
            calls.clear()
            latents = FlowMatching(strength=0.35, num_steps=steps).img2img(
                velocity, start, torch.randn_like(start)
            )
            assert len(calls) == steps
            assert latents.shape == start.shape
    finally:
        handle.remove()


def test_sampler_schedule_runs_from_strength_to_zero():
    sampler = FlowMatching(strength=0.35, num_steps=20)
    sigmas = sampler.scheduler().sigmas
    assert len(sigmas) == 21
    assert sigmas[0].item() == pytest.approx(0.35) and sigmas[-1].item() == 0.0
    assert torch.all(sigmas[1:] < sigmas[:-1])


def test_sampler_with_perfect_velocity_returns_clean_latent():
    clean = torch.randn(2, 4, 8, 8)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(7))
    seen_sigmas = []

    def perfect_velocity(latents, sigmas):
        seen_sigmas.append(sigmas[0].item())
        return velocity_target(clean, noise)

    sampler = FlowMatching(strength=0.35, num_steps=20)
    result = sampler.img2img(perfect_velocity, clean, noise)
    assert len(seen_sigmas) == 20 and seen_sigmas[0] == pytest.approx(0.35)
    torch.testing.assert_close(result, clean, atol=1e-5, rtol=0)


def test_sampler_is_a_function_of_the_given_noise():
    sampler = FlowMatching(num_steps=2)
    start = torch.randn(1, 4, 8, 8)

    def velocity(latents, sigmas):
        return latents * 0.5

    def noise(seed: int) -> torch.Tensor:
        return torch.randn(start.shape, generator=torch.Generator().manual_seed(seed))

    first = sampler.img2img(velocity, start, noise(3))
    second = sampler.img2img(velocity, start, noise(3))
    third = sampler.img2img(velocity, start, noise(4))
    assert torch.equal(first, second) and not torch.equal(first, third)
    with pytest.raises(ValueError, match="noise"):
        sampler.img2img(velocity, start, torch.randn(2, 4, 8, 8))


def test_flow_matching_identities():
    clean, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigmas = torch.tensor([0.0, 0.5, 1.0])
    noisy = add_noise(clean, noise, sigmas)
    torch.testing.assert_close(noisy[0], clean[0])
    torch.testing.assert_close(noisy[2], noise[2])
    torch.testing.assert_close(clean_estimate(noisy, velocity_target(clean, noise), sigmas), clean)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_training_sigmas_lie_in_unit_interval(sampling):
    sigmas = FlowMatching(sigma_sampling=sampling).sample_sigmas(512, torch.device("cpu"), torch.Generator())
    assert sigmas.shape == (512,) and sigmas.min() >= 0 and sigmas.max() <= 1
    if sampling == "logit_normal":  # concentrated around 0.5, unlike the uniform draw
        assert (sigmas - 0.5).abs().mean() < 0.2


def test_invalid_sampler_settings_name_the_key():
    with pytest.raises(ValueError, match="strength"):
        FlowMatching(strength=0.0)
    with pytest.raises(ValueError, match="num_steps"):
        FlowMatching(num_steps=0)


def test_missing_model_folder_names_the_key(tmp_path):
    encoders = tiny_text_encoders(tiny_backbone_args())
    with pytest.raises(FileNotFoundError, match="transformer_path"):
        SD3Backbone.from_pretrained(str(tmp_path / "missing"), str(tmp_path), encoders)
    with pytest.raises(FileNotFoundError, match="t5_path"):
        SD3TextEncoders.from_pretrained(
            str(tmp_path), str(tmp_path), str(tmp_path / "no_t5"), str(tmp_path), str(tmp_path), str(tmp_path)
        )


def test_from_pretrained_loads_saved_folders(tmp_path, backbone):
    """The pretrained path reads diffusers folders: save the tiny parts and load them back."""
    args = tiny_backbone_args()
    with seeded(args["seed"]):
        SD3Transformer2DModel(**args["transformer"]).save_pretrained(tmp_path / "transformer")
        AutoencoderKL(**args["vae"]).save_pretrained(tmp_path / "vae")
    loaded = SD3Backbone.from_pretrained(
        str(tmp_path / "transformer"),
        str(tmp_path / "vae"),
        tiny_text_encoders(tiny_backbone_args()),
        transformer_dtype="float32",
    )
    torch.testing.assert_close(loaded.vae.encoder.conv_in.weight, backbone.vae.encoder.conv_in.weight)
    base = loaded.transformer.transformer_blocks[0].attn.to_q.base_layer.weight
    torch.testing.assert_close(base, backbone.transformer.transformer_blocks[0].attn.to_q.base_layer.weight)


def test_bf16_transformer_trains_fp32_lora_that_moves_at_the_smallest_lr():
    """bf16 base, fp32 LoRA: one AdamW step at the cosine tail's lr 1e-6 moves every LoRA entry with a gradient."""
    backbone = build_tiny_backbone(transformer_dtype="bfloat16")
    frozen = [p for p in backbone.transformer.parameters() if not p.requires_grad]
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    with torch.no_grad():  # a trained LoRA: B != 0, so lora_A gets gradients too
        for name, param in backbone.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.02, generator=torch.Generator().manual_seed(0))
    tokens, pooled = adapter_conditioning(backbone, 2)
    latents = torch.randn(2, backbone.latent_channels, 8, 8)
    velocity = backbone.velocity(latents, torch.full((2,), 0.5), tokens, pooled)
    velocity.square().mean().backward()
    before = [p.detach().clone() for p in trainable]
    torch.optim.AdamW(trainable, lr=1e-6, weight_decay=0.0).step()
    for param, old in zip(trainable, before, strict=True):
        with_gradient = param.grad != 0
        assert with_gradient.any()
        assert (param.detach() != old)[with_gradient].all()


def test_random_transformer_is_built_in_its_target_dtype(monkeypatch):
    """No fp32 copy of a bf16 transformer is ever made (SD3.5 Medium: 11 GiB peak RSS otherwise)."""
    import networks.sd3 as sd3

    created = []

    class RecordingTransformer(SD3Transformer2DModel):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            created.append({p.dtype for p in self.parameters()})

    monkeypatch.setattr(sd3, "SD3Transformer2DModel", RecordingTransformer)
    backbone = build_tiny_backbone(transformer_dtype="bfloat16")
    assert created == [{torch.bfloat16}]
    assert {b.dtype for b in backbone.transformer.buffers() if b.is_floating_point()} == {torch.bfloat16}
    assert backbone.vae.dtype == torch.float32
