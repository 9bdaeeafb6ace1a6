"""Stable Diffusion 3 parts for Sat-JEPA-Diff: frozen transformer with LoRA, frozen fp32 VAE, fixed prompt.

Every part has two interchangeable constructors that a config picks by ``class_path``:
``SD3Backbone.from_pretrained`` / ``SD3TextEncoders.from_pretrained`` load local diffusers/transformers folders
(the SD3.5 Medium layout: ``transformer/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``), and ``from_config``
builds the same classes with random weights from plain dicts (tiny test models, the real-size benchmark). Random
builds are seeded so that a module rebuilt from its config has bit-identical frozen weights, which is what lets
checkpoints omit them.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from fileio import atomic_open

PAPER_PROMPT = (
    "High-resolution Sentinel-2 satellite image, multispectral earth observation, natural colors RGB composite, "
    "10m ground resolution, clear atmospheric conditions, detailed land surface features"
)
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
CONTEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require_folder(path: str | None, key: str) -> str:
    """Return ``path`` if it is an existing folder, else raise an error naming the config key."""
    if path is None or not Path(path).is_dir():
        raise FileNotFoundError(f"config key '{key}': model folder not found: {path!r}")
    return str(path)


def require_file(path: str, key: str) -> str:
    """Return ``path`` if it is an existing file, else raise an error naming the config key."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"config key '{key}': weights file not found: {path!r}")
    return str(path)


def load_weights(model: nn.Module, path: str, key: str) -> dict[str, str]:
    """Load a safetensors state dict (all keys, matching shapes) into ``model``; return the file's metadata."""
    with safe_open(require_file(path, key), framework="pt") as stream:
        metadata = stream.metadata() or {}
    try:
        model.load_state_dict(load_file(path))
    except RuntimeError as exc:
        raise ValueError(
            f"config key '{key}': {path} does not fit the configured architecture ({exc})"
        ) from exc
    return metadata


def check_latent_factors(vae: AutoencoderKL, metadata: dict[str, str], path: str) -> None:
    """A trained VAE's latents are normalised by the shift/scale computed from them (stored beside the weights)."""
    for name in ("shift_factor", "scaling_factor"):
        if name in metadata and abs(float(metadata[name]) - getattr(vae.config, name)) > 1e-4:
            raise ValueError(
                f"config key 'vae.{name}' is {getattr(vae.config, name)} but {path} was trained with "
                f"{name} {float(metadata[name]):.6g}: set it to that value"
            )


def parse_dtype(name: str, key: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"config key '{key}': dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw random initial weights from ``seed`` without disturbing the global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create new parameters in ``dtype``, so a bf16 model is never first built as an fp32 copy (2x the RSS)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def cast_float_buffers(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point buffers (tables built from numpy in float32) to ``dtype``; parameters are untouched."""
    for submodule in module.modules():
        for name, buffer in submodule.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(submodule, name, buffer.to(dtype))


class SD3TextEncoders(nn.Module):
    """CLIP-L, CLIP-G (with projection) and T5 with their tokenizers, used once to embed the fixed prompt.

    ``SD3Backbone`` calls :meth:`encode` once at construction and then :meth:`release`, so the multi-gigabyte
    encoders never stay in memory during training; only the resulting embeddings are kept (as buffers).
    """

    def __init__(
        self,
        clip_l: nn.Module,
        clip_g: nn.Module,
        t5: nn.Module,
        tokenizer_l,
        tokenizer_g,
        tokenizer_t5,
    ):
        super().__init__()
        self.clip_l = clip_l
        self.clip_g = clip_g
        self.t5 = t5
        self.tokenizers = (tokenizer_l, tokenizer_g, tokenizer_t5)

    @classmethod
    def from_pretrained(
        cls,
        clip_l_path: str,
        clip_g_path: str,
        t5_path: str,
        tokenizer_l_path: str,
        tokenizer_g_path: str,
        tokenizer_t5_path: str,
        dtype: str = "float32",
    ) -> SD3TextEncoders:
        """Load the three encoders and tokenizers from local folders (e.g. ``<sd3.5>/text_encoder_3``)."""
        torch_dtype = parse_dtype(dtype, "dtype")
        folders = {
            key: require_folder(path, key)
            for key, path in {
                "clip_l_path": clip_l_path,
                "clip_g_path": clip_g_path,
                "t5_path": t5_path,
                "tokenizer_l_path": tokenizer_l_path,
                "tokenizer_g_path": tokenizer_g_path,
                "tokenizer_t5_path": tokenizer_t5_path,
            }.items()
        }
        return cls(
            CLIPTextModelWithProjection.from_pretrained(folders["clip_l_path"], torch_dtype=torch_dtype),
            CLIPTextModelWithProjection.from_pretrained(folders["clip_g_path"], torch_dtype=torch_dtype),
            T5EncoderModel.from_pretrained(folders["t5_path"], torch_dtype=torch_dtype),
            AutoTokenizer.from_pretrained(folders["tokenizer_l_path"]),
            AutoTokenizer.from_pretrained(folders["tokenizer_g_path"]),
            AutoTokenizer.from_pretrained(folders["tokenizer_t5_path"]),
        )

    @classmethod
    def from_config(
        cls, clip_l: dict, clip_g: dict, t5: dict, tokenizer_path: str, seed: int = 0
    ) -> SD3TextEncoders:
        """Random encoders from config dicts sharing one local tokenizer folder (tiny tests, benchmarks)."""
        tokenizer = AutoTokenizer.from_pretrained(require_folder(tokenizer_path, "tokenizer_path"))
        with seeded(seed):
            encoders = (
                CLIPTextModelWithProjection(CLIPTextConfig(**clip_l)),
                CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)),
                T5EncoderModel(T5Config(**t5)),
            )
        return cls(*encoders, tokenizer, tokenizer, tokenizer)

    @torch.no_grad()
    def encode(self, prompt: str, max_sequence_length: int) -> tuple[Tensor, Tensor]:
        """SD3's prompt embedding: tokens ``(1, 77 + max_sequence_length, t5_dim)``, pooled ``(1, clip_l + clip_g)``.

        Uses diffusers' own ``encode_prompt`` (CLIP penultimate states joined on channels, zero-padded to the T5
        width, then concatenated with the T5 tokens along the sequence; pooled = CLIP-L and CLIP-G projections).
        """
        if self.t5 is None:
            raise RuntimeError("SD3TextEncoders were released; the prompt embedding is computed only once")
        self.eval()  # T5 has dropout; the fixed prompt must embed deterministically
        tokenizer_l, tokenizer_g, tokenizer_t5 = self.tokenizers
        pipeline = StableDiffusion3Pipeline(
            transformer=None,
            scheduler=None,
            vae=None,
            text_encoder=self.clip_l,
            tokenizer=tokenizer_l,
            text_encoder_2=self.clip_g,
            tokenizer_2=tokenizer_g,
            text_encoder_3=self.t5,
            tokenizer_3=tokenizer_t5,
        )
        tokens, _, pooled, _ = pipeline.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            device=next(self.t5.parameters()).device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return tokens.float(), pooled.float()

    def release(self) -> None:
        """Drop the encoders and tokenizers so their memory is freed once the prompt is embedded."""
        self.clip_l = self.clip_g = self.t5 = None
        self.tokenizers = ()


class SD3Backbone(nn.Module):
    """Frozen SD3 transformer (trainable LoRA on its attention) + frozen float32 VAE + the fixed prompt embedding.

    Only the LoRA weights require grad, and they are always float32 whatever the frozen transformer's dtype
    (``cast_training_params``, as diffusers' LoRA scripts do): under ``bf16-mixed`` Lightning keeps no fp32
    master copy, and bf16 weights would round most AdamW updates at lr 1e-4 .. 1e-6 away. The prompt is embedded once by ``text_encoders`` (which are released
    afterwards) and kept as buffers; adapter conditioning is appended to those prompt tokens along the sequence,
    and the pooled vector is the mean of the CLIP pooled prompt and the adapter's pooled vector (the reference's
    choice, which keeps the pooled input at the scale the frozen ``time_text_embed`` was trained on).
    """

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        text_encoders: SD3TextEncoders,
        prompt: str = PAPER_PROMPT,
        max_sequence_length: int = 77,
        lora_rank: int = 8,
        lora_alpha: int = 16,
        lora_context_projections: bool = False,
    ):
        super().__init__()
        self.transformer = transformer.requires_grad_(False)
        if vae.dtype != torch.float32:
            raise ValueError(f"the VAE must be float32 for stable encoding/decoding, got {vae.dtype}")
        self.vae = vae.requires_grad_(False)
        targets = ATTENTION_PROJECTIONS + (CONTEXT_PROJECTIONS if lora_context_projections else ())
        self.transformer.add_adapter(
            LoraConfig(
                r=lora_rank, lora_alpha=lora_alpha, init_lora_weights="gaussian", target_modules=list(targets)
            )
        )
        cast_training_params(self.transformer, dtype=torch.float32)
        prompt_tokens, prompt_pooled = text_encoders.encode(prompt, max_sequence_length)
        text_encoders.release()
        config = self.transformer.config
        if prompt_tokens.shape[-1] != config.joint_attention_dim:
            raise ValueError(
                f"T5 width {prompt_tokens.shape[-1]} != transformer joint_attention_dim {config.joint_attention_dim}"
            )
        if prompt_pooled.shape[-1] != config.pooled_projection_dim:
            raise ValueError(
                f"CLIP pooled width {prompt_pooled.shape[-1]} != transformer pooled_projection_dim "
                f"{config.pooled_projection_dim}"
            )
        self.register_buffer("prompt_tokens", prompt_tokens)
        self.register_buffer("prompt_pooled", prompt_pooled)

    @classmethod
    def from_pretrained(
        cls,
        transformer_path: str,
        vae_path: str,
        text_encoders: SD3TextEncoders,
        transformer_dtype: str = "bfloat16",
        prompt: str = PAPER_PROMPT,
        max_sequence_length: int = 77,
        lora_rank: int = 8,
        lora_alpha: int = 16,
        lora_context_projections: bool = False,
    ) -> SD3Backbone:
        """Load SD3(.5) from local folders (``<model>/transformer``, ``<model>/vae``); nothing is downloaded."""
        transformer_folder = require_folder(transformer_path, "transformer_path")
        vae_folder = require_folder(vae_path, "vae_path")
        transformer = SD3Transformer2DModel.from_pretrained(
            transformer_folder, torch_dtype=parse_dtype(transformer_dtype, "transformer_dtype")
        )
        vae = AutoencoderKL.from_pretrained(vae_folder, torch_dtype=torch.float32)
        return cls(
            transformer,
            vae,
            text_encoders,
            prompt,
            max_sequence_length,
            lora_rank,
            lora_alpha,
            lora_context_projections,
        )

    @classmethod
    def from_config(
        cls,
        transformer: dict,
        vae: dict,
        text_encoders: SD3TextEncoders,
        seed: int = 0,
        transformer_weights: str | None = None,
        vae_weights: str | None = None,
        transformer_dtype: str = "float32",
        prompt: str = PAPER_PROMPT,
        max_sequence_length: int = 77,
        lora_rank: int = 8,
        lora_alpha: int = 16,
        lora_context_projections: bool = False,
    ) -> SD3Backbone:
        """Seeded transformer and VAE from diffusers config dicts (same keys as their config.json), random unless
        ``transformer_weights`` / ``vae_weights`` name local safetensors files of those architectures (the demo's
        trained tiny parts, ``tools/train_demo_weights.py``).

        The transformer's parameters are created directly in ``transformer_dtype`` (its few float32 buffers,
        such as the position table, are cast afterwards), the VAE always in float32.
        """
        dtype = parse_dtype(transformer_dtype, "transformer_dtype")
        with seeded(seed):
            with default_dtype(dtype):
                transformer_model = SD3Transformer2DModel(**transformer)
            cast_float_buffers(transformer_model, dtype)
            vae_model = AutoencoderKL(**vae)
        if transformer_weights is not None:
            load_weights(transformer_model, transformer_weights, "transformer_weights")
        if vae_weights is not None:
            check_latent_factors(vae_model, load_weights(vae_model, vae_weights, "vae_weights"), vae_weights)
        return cls(
            transformer_model,
            vae_model,
            text_encoders,
            prompt,
            max_sequence_length,
            lora_rank,
            lora_alpha,
            lora_context_projections,
        )

    @property
    def joint_dim(self) -> int:
        return self.transformer.config.joint_attention_dim

    @property
    def pooled_dim(self) -> int:
        return self.transformer.config.pooled_projection_dim

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def encode(self, images: Tensor) -> Tensor:
        """Images in [0, 1] ``(B, 3, H, W)`` -> normalised latents (VAE mean, shifted and scaled), in float32."""
        with torch.autocast(images.device.type, enabled=False):
            latents = self.vae.encode(images.float() * 2 - 1).latent_dist.mode()
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def decode(self, latents: Tensor, autocast_dtype: torch.dtype | None = None) -> Tensor:
        """Normalised latents -> float32 images ``(B, 3, H, W)`` on the [0, 1] scale (not clamped: gradients flow).

        The decoder runs in float32 unless ``autocast_dtype`` (e.g. bf16 for the training SSIM term, where the
        decoder is a fifth of a step's FLOPs) is given.
        """
        with torch.autocast(latents.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            latents = latents.float() / self.vae.config.scaling_factor + self.vae.config.shift_factor
            images = self.vae.decode(latents).sample
        return (images.float() + 1) / 2

    def conditioning(self, tokens: Tensor, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """Prompt tokens followed by the adapter ``tokens``; pooled = mean of CLIP pooled and adapter ``pooled``."""
        batch_size = tokens.shape[0]
        prompt_tokens = self.prompt_tokens.expand(batch_size, -1, -1)
        prompt_pooled = self.prompt_pooled.expand(batch_size, -1)
        return torch.cat([prompt_tokens, tokens.float()], dim=1), (prompt_pooled + pooled.float()) / 2

    def velocity(self, latents: Tensor, sigmas: Tensor, tokens: Tensor, pooled: Tensor) -> Tensor:
        """The transformer's velocity prediction at noise levels ``sigmas`` ``(B,)`` in [0, 1], in float32."""
        dtype = self.transformer.dtype
        output = self.transformer(
            hidden_states=latents.to(dtype),
            encoder_hidden_states=tokens.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=sigmas * 1000,
            return_dict=False,
        )[0]
        return output.float()


class LatentCache:
    """Target latents of fixed windows, so the frozen VAE encodes each window once instead of every epoch.

    Stores exactly what ``SD3Backbone.encode`` returns (the VAE posterior mean, shifted and scaled: no sample
    is drawn, so a cached latent equals a fresh one) under the key ``region|window transform|target time``, in
    memory (CPU) and, with ``folder``, as one ``.pt`` file per key (written atomically; shared by runs and
    ranks that use the same VAE). Only windows that repeat benefit: grid windows do, random crops never hit
    (each crop is a new key and is stored), so leave it off (null) for random-crop training.
    """

    def __init__(self, folder: str | None = None):
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.memory: dict[str, Tensor] = {}

    def path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.pt"

    def lookup(self, key: str) -> Tensor | None:
        if key not in self.memory and self.folder is not None and self.path(key).is_file():
            self.memory[key] = torch.load(self.path(key), map_location="cpu", weights_only=True)
        return self.memory.get(key)

    def store(self, key: str, latent: Tensor) -> None:
        self.memory[key] = latent.detach().cpu()
        if self.folder is not None:
            with atomic_open(self.path(key), "wb") as stream:
                torch.save(self.memory[key], stream)

    @torch.no_grad()
    def encode(self, backbone: SD3Backbone, images: Tensor, keys: list[str]) -> Tensor:
        """Latents of ``images`` ``(B, 3, H, W)``, encoding only those whose key is not cached yet."""
        if len(keys) != images.shape[0]:
            raise ValueError(f"LatentCache.encode: {len(keys)} keys for {images.shape[0]} images")
        cached = [self.lookup(key) for key in keys]
        missing = [i for i, latent in enumerate(cached) if latent is None]
        if missing:
            fresh = backbone.encode(images[missing])
            for i, latent in zip(missing, fresh, strict=True):
                self.store(keys[i], latent)
                cached[i] = latent
        return torch.stack([latent.to(images.device) for latent in cached])
