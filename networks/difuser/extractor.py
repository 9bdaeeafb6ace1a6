"""Frozen diffusion feature extractor of SatDiFuser (DiffusionSat or SD 2.1 UNet, VAE and CLIP prompt).

An image is encoded by the VAE (posterior mean, deterministic), DDIM-inverted (eta 0) to each selected timestep,
and at every selected timestep the UNet's decoder (up) blocks are read with forward hooks: ResNet residual-branch
outputs (``conv2``, the paper's "ResNet residual outputs"), whole ResNet block outputs (shortcut + residual) and
self-attention (``attn1``) outputs, reshaped to ``(B, C, h, w)`` and grouped by resolution into a 4-level pyramid,
finest first (contract in docs/DESIGN.md, "SatDiFuser contracts").

Two entry points serve the feature cache's tiers: ``forward`` (image -> pyramid) and ``noisy_latents`` +
``features_from_latents`` (image -> inverted latents at the selected timesteps, ~24 KB per 256 px sample; latents ->
pyramid in one batched UNet call over all selected timesteps).

The backbone is injected as a ``DiffusionBackbone`` (``class_path``): ``PretrainedDiffusionBackbone`` loads a local
diffusers folder, ``RandomDiffusionBackbone`` builds the same classes with tiny random weights for tests.
Everything is frozen: no grad, always in eval mode, never in the optimizer (parameters do not require grad).
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BlockType = Literal["resnet_residual", "resnet_output", "attn"]
BLOCK_TYPE_ORDER: tuple[BlockType, ...] = ("resnet_residual", "resnet_output", "attn")
ComputeDtype = Literal["float32", "bfloat16"]
PYRAMID_LEVELS = 4
SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class DiffusionParts:
    """What a backbone provides; ``weights_identity`` names the weights for the feature cache key."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    weights_identity: str


class DiffusionBackbone(abc.ABC):
    """Builds the frozen diffusion parts; subclasses are chosen in config by ``class_path``."""

    @abc.abstractmethod
    def load(self) -> DiffusionParts:
        """Build (or load) UNet, VAE, text encoder, tokenizer and noise scheduler."""


class PretrainedDiffusionBackbone(DiffusionBackbone):
    """A local diffusers folder: DiffusionSat (UNet in ``checkpoint-150000/unet``) or Stable Diffusion 2.1.

    DiffusionSat's UNet is an SD 2.1 UNet plus metadata embeddings; it loads into the stock
    ``UNet2DConditionModel`` (diffusers warns about the extra config keys and unused metadata weights, which
    SatDiFuser does not use: no metadata conditioning). Subfolders are relative to ``root`` (``../sd21/vae``
    works when the components live elsewhere). Nothing is downloaded.
    """

    def __init__(
        self,
        root: str | None,
        unet_subfolder: str = "unet",
        vae_subfolder: str = "vae",
        text_encoder_subfolder: str = "text_encoder",
        tokenizer_subfolder: str = "tokenizer",
        scheduler_subfolder: str = "scheduler",
    ):
        if root is None or not Path(root).is_dir():
            raise FileNotFoundError(
                f"diffusion weights folder not found: {root!r} (config key "
                "model.init_args.extractor.init_args.backbone.init_args.root; download DiffusionSat or SD 2.1 "
                "in diffusers format and point this key at it)"
            )
        self.root = Path(root)
        self.subfolders = {
            "unet_subfolder": unet_subfolder,
            "vae_subfolder": vae_subfolder,
            "text_encoder_subfolder": text_encoder_subfolder,
            "tokenizer_subfolder": tokenizer_subfolder,
            "scheduler_subfolder": scheduler_subfolder,
        }
        for key, subfolder in self.subfolders.items():
            if not (self.root / subfolder).is_dir():
                raise FileNotFoundError(
                    f"{self.root / subfolder} not found (config key "
                    f"model.init_args.extractor.init_args.backbone.init_args.{key}, relative to root {self.root})"
                )

    def weights_identity(self) -> str:
        """Paths, sizes and modification times of every weight/config file: changes when the files change."""
        entries = []
        for key in sorted(self.subfolders):
            folder = (self.root / self.subfolders[key]).resolve()
            for file in sorted(p for p in folder.rglob("*") if p.is_file()):
                stat = file.stat()
                entries.append([str(file), stat.st_size, stat.st_mtime_ns])
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()

    def load(self) -> DiffusionParts:
        def path(key: str) -> Path:
            return self.root / self.subfolders[key]

        return DiffusionParts(
            unet=UNet2DConditionModel.from_pretrained(path("unet_subfolder"), local_files_only=True),
            vae=AutoencoderKL.from_pretrained(path("vae_subfolder"), local_files_only=True),
            text_encoder=CLIPTextModel.from_pretrained(path("text_encoder_subfolder"), local_files_only=True),
            tokenizer=CLIPTokenizer.from_pretrained(path("tokenizer_subfolder"), local_files_only=True),
            scheduler=DDIMScheduler.from_pretrained(path("scheduler_subfolder"), local_files_only=True),
            weights_identity=self.weights_identity(),
        )


def byte_level_clip_tokenizer(max_length: int) -> CLIPTokenizer:
    """A CLIP tokenizer over a generated byte-level vocabulary (no merges): offline, for tiny test models."""
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [f"{char}</w>" for char in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


class RandomDiffusionBackbone(DiffusionBackbone):
    """The same diffusers/transformers classes with random weights from small configs (tests, benchmarks).

    ``unet``, ``vae`` and ``scheduler`` are keyword arguments of ``UNet2DConditionModel``, ``AutoencoderKL`` and
    ``DDIMScheduler``; ``text_encoder`` of ``CLIPTextConfig`` (vocabulary and special tokens come from the generated
    tokenizer). Weights depend only on ``seed``; the global RNG is left untouched.
    """

    def __init__(
        self,
        unet: dict[str, Any],
        vae: dict[str, Any],
        text_encoder: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        seed: int = 0,
        max_prompt_tokens: int = 32,
    ):
        self.unet_config = unet
        self.vae_config = vae
        self.text_encoder_config = text_encoder
        self.scheduler_config = scheduler or {}
        self.seed = seed
        self.max_prompt_tokens = max_prompt_tokens

    def load(self) -> DiffusionParts:
        tokenizer = byte_level_clip_tokenizer(self.max_prompt_tokens)
        text_config = CLIPTextConfig(
            **{
                "max_position_embeddings": self.max_prompt_tokens,
                **self.text_encoder_config,
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            }
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            unet = UNet2DConditionModel(**self.unet_config)
            vae = AutoencoderKL(**self.vae_config)
            text_encoder = CLIPTextModel(text_config)
        digest = hashlib.sha256()
        for module in (unet, vae, text_encoder):
            for name, tensor in module.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return DiffusionParts(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=DDIMScheduler(**self.scheduler_config),
            weights_identity=digest.hexdigest(),
        )


def inversion_path(selected: list[int], num_inversion_steps: int, num_train_timesteps: int) -> list[int]:
    """Timesteps the DDIM inversion visits: the even DDIM grid (stride T / steps, from 0) up to the largest
    selected timestep, with every selected timestep inserted so features are read exactly where asked."""
    stride = max(1, num_train_timesteps // num_inversion_steps)
    grid = set(range(0, max(selected) + 1, stride))
    return sorted(grid | set(selected))


def ddim_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha_from: torch.Tensor | float,
    alpha_to: torch.Tensor | float,
    prediction_type: str,
) -> torch.Tensor:
    """Deterministic DDIM (eta 0) move of ``sample`` from cumulative alpha ``alpha_from`` to ``alpha_to``.

    Works in both directions (inversion: alpha decreasing). The model output is turned into the predicted clean
    sample and noise according to the scheduler's prediction type (v-prediction is converted, not taken as eps).
    """
    alpha_from = torch.as_tensor(alpha_from, dtype=sample.dtype, device=sample.device)
    alpha_to = torch.as_tensor(alpha_to, dtype=sample.dtype, device=sample.device)
    if prediction_type == "epsilon":
        noise = model_output
        clean = (sample - (1 - alpha_from).sqrt() * noise) / alpha_from.sqrt()
    elif prediction_type == "v_prediction":
        clean = alpha_from.sqrt() * sample - (1 - alpha_from).sqrt() * model_output
        noise = alpha_from.sqrt() * model_output + (1 - alpha_from).sqrt() * sample
    else:
        raise ValueError(
            f"prediction_type {prediction_type!r} not supported; use one of {SUPPORTED_PREDICTION_TYPES}"
        )
    return alpha_to.sqrt() * clean + (1 - alpha_to).sqrt() * noise


@dataclass(frozen=True)
class _CapturePoint:
    """One hooked decoder module and where its map goes in the pyramid."""

    level: int
    index: int
    kind: BlockType
    layer: int  # position among the level's blocks of the same kind
    module: nn.Module
    transformer: nn.Module | None  # the Transformer2DModel holding an attn1 (gives the spatial size)


class DiffusionFeatureExtractor(nn.Module):
    """Frozen SatDiFuser extractor: images ``(B, C, H, W)`` in [0, 1] -> pyramid ``list[list[(B, C_j, h, w)]]``.

    ``timesteps`` are sorted ascending (paper: 1, 100, 200); ``block_types`` picks decoder maps: ``resnet_residual``
    (a ResNet's residual branch, ``conv2``: the paper's and the reference's choice, default), ``resnet_output``
    (the whole ResnetBlock2D output: shortcut of the concatenated skip plus residual) and ``attn`` (self-attention);
    within a level, for each layer, in that order. ``image_size`` resizes (bilinear, antialiased when shrinking) to
    the backbone's resolution (256 or 512 for DiffusionSat). ``rgb_bands`` selects the 3 input channels the VAE needs
    when the data has more bands (red, green, blue order). ``compute_dtype`` ``bfloat16`` runs the frozen VAE and
    UNet under autocast (the DDIM arithmetic stays float32).
    """

    def __init__(
        self,
        backbone: DiffusionBackbone,
        timesteps: list[int] = [1, 100, 200],  # noqa: B006  (jsonargparse needs a literal default)
        block_types: list[BlockType] = ["resnet_residual", "attn"],  # noqa: B006
        num_inversion_steps: int = 50,
        prompt: str = "A satellite image",
        image_size: int | None = None,
        rgb_bands: list[int] | None = None,
        compute_dtype: ComputeDtype = "float32",
    ):
        super().__init__()
        parts = backbone.load()
        scheduler_config = parts.scheduler.config
        num_train_timesteps = scheduler_config.num_train_timesteps
        if not timesteps or len(set(timesteps)) != len(timesteps):
            raise ValueError(f"extractor timesteps must be a non-empty list without repeats, got {timesteps}")
        if min(timesteps) < 0 or max(timesteps) >= num_train_timesteps:
            raise ValueError(f"extractor timesteps {timesteps} must lie in [0, {num_train_timesteps - 1}]")
        if (
            not block_types
            or len(set(block_types)) != len(block_types)
            or set(block_types) - set(BLOCK_TYPE_ORDER)
        ):
            raise ValueError(
                f"extractor block_types must be a non-empty subset of {list(BLOCK_TYPE_ORDER)}, got {block_types}"
            )
        if compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"extractor compute_dtype must be float32 or bfloat16, got {compute_dtype!r}")
        if num_inversion_steps < 1:
            raise ValueError(f"extractor num_inversion_steps must be >= 1, got {num_inversion_steps}")
        if scheduler_config.prediction_type not in SUPPORTED_PREDICTION_TYPES:
            raise ValueError(
                f"scheduler prediction_type {scheduler_config.prediction_type!r} is not supported for DDIM "
                f"inversion; use one of {SUPPORTED_PREDICTION_TYPES}"
            )
        if rgb_bands is not None and len(rgb_bands) != 3:
            raise ValueError(
                f"extractor rgb_bands must name 3 band indices (red, green, blue), got {rgb_bands}"
            )

        self.timesteps = sorted(timesteps)
        self.block_types = list(block_types)
        self.num_timesteps = len(self.timesteps)
        self.prediction_type = scheduler_config.prediction_type
        self.image_size = image_size
        self.rgb_bands = rgb_bands
        self.compute_dtype = compute_dtype
        self.path = inversion_path(self.timesteps, num_inversion_steps, num_train_timesteps)

        self.unet = parts.unet
        self.vae = parts.vae
        self.requires_grad_(False)
        self.eval()
        self.register_buffer(
            "alphas_cumprod", parts.scheduler.alphas_cumprod.to(torch.float32).clone(), persistent=False
        )
        self.register_buffer(
            "prompt_embeds",
            self._encode_prompt(prompt, parts.tokenizer, parts.text_encoder),
            persistent=False,
        )
        # tokenizer and text encoder are not kept: the prompt is fixed, so its embedding is all we need.

        self._capture_points = self._find_capture_points()
        self.feature_channels = self._feature_channels()
        # per level, the (kind, layer) of each block of one timestep, in pyramid order (SingleFeature selects by it)
        self.block_layout = [
            [(p.kind, p.layer) for p in self._capture_points if p.level == level]
            for level in range(PYRAMID_LEVELS)
        ]
        self.latent_channels = int(self.vae.config.latent_channels)
        self.cache_identity = hashlib.sha256(
            json.dumps(
                {
                    "extractor": type(self).__name__,
                    "timesteps": self.timesteps,
                    "block_types": self.block_types,
                    "inversion_path": self.path,
                    "prompt": prompt,
                    "image_size": image_size,
                    "rgb_bands": rgb_bands,
                    "compute_dtype": compute_dtype,
                    # bumped when the same config computes other values (v2: antialiased shrinking, one call at t=0)
                    "version": 2,
                    "scheduler": {k: v for k, v in scheduler_config.items() if not k.startswith("_")},
                    "weights": parts.weights_identity,
                },
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()

    @staticmethod
    @torch.no_grad()
    def _encode_prompt(prompt: str, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> torch.Tensor:
        tokens = tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        text_encoder.eval()
        return text_encoder(tokens.input_ids)[0].detach().to(torch.float32)

    def _find_capture_points(self) -> list[_CapturePoint]:
        """Decoder modules to hook, each with its pyramid level (by resolution, finest = 0) and index."""
        up_blocks = list(self.unet.up_blocks)
        # A block's resolution halves for each upsampler at or after it, so count them to get its level.
        levels = [sum(block.upsamplers is not None for block in up_blocks[i:]) for i in range(len(up_blocks))]
        if sorted(set(levels)) != list(range(PYRAMID_LEVELS)):
            raise ValueError(
                f"the UNet decoder has resolution levels {sorted(set(levels))}; the pyramid needs {PYRAMID_LEVELS}"
            )
        points: list[_CapturePoint] = []
        counts = [0] * PYRAMID_LEVELS
        kind_counts = [dict.fromkeys(BLOCK_TYPE_ORDER, 0) for _ in range(PYRAMID_LEVELS)]
        for block, level in zip(up_blocks, levels, strict=True):
            attentions = list(getattr(block, "attentions", None) or [])
            for layer, resnet in enumerate(block.resnets):
                candidates: list[tuple[BlockType, nn.Module, nn.Module | None]] = [
                    ("resnet_residual", resnet.conv2, None),
                    ("resnet_output", resnet, None),
                ]
                if layer < len(attentions):
                    transformer = attentions[layer]
                    candidates += [("attn", tb.attn1, transformer) for tb in transformer.transformer_blocks]
                for kind, module, transformer in candidates:
                    if kind not in self.block_types:
                        continue
                    points.append(
                        _CapturePoint(
                            level, counts[level], kind, kind_counts[level][kind], module, transformer
                        )
                    )
                    counts[level] += 1
                    kind_counts[level][kind] += 1
        empty = [level for level in range(PYRAMID_LEVELS) if counts[level] == 0]
        if empty:
            raise ValueError(
                f"block_types {self.block_types} capture no decoder map at pyramid level(s) {empty}"
            )
        return points

    def _feature_channels(self) -> list[list[int]]:
        per_level: list[list[int]] = [[] for _ in range(PYRAMID_LEVELS)]
        for point in self._capture_points:
            channels = point.module.out_dim if point.kind == "attn" else point.module.out_channels
            per_level[point.level].append(int(channels))
        return [channels * self.num_timesteps for channels in per_level]

    def train(self, mode: bool = True) -> DiffusionFeatureExtractor:
        """Stay in eval mode whatever the parent asks: the extractor is frozen."""
        return super().train(False)

    @contextmanager
    def _capture(self) -> Iterator[list[list[torch.Tensor | None]]]:
        """Hook the decoder modules for one UNet call; yields ``maps[level][index]`` filled by the call."""
        maps: list[list[torch.Tensor | None]] = [
            [None] * (len(c) // self.num_timesteps) for c in self.feature_channels
        ]
        spatial: dict[nn.Module, tuple[int, int]] = {}  # Transformer2DModel -> (h, w) of its input

        def remember_size(transformer, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            spatial[transformer] = tuple(hidden.shape[-2:])

        handles = [
            transformer.register_forward_pre_hook(remember_size, with_kwargs=True)
            for transformer in {point.transformer for point in self._capture_points} - {None}
        ]
        for point in self._capture_points:

            def store(module, args, output, point=point):
                if point.kind == "attn":
                    height, width = spatial[point.transformer]
                    batch, _, channels = output.shape
                    output = output.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
                maps[point.level][point.index] = output.float().contiguous()

            handles.append(point.module.register_forward_hook(store))
        try:
            yield maps
        finally:
            for handle in handles:
                handle.remove()

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.compute_dtype == "bfloat16")

    def predict(self, sample: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        """The UNet output (eps or v, as the scheduler says) for the fixed prompt, in float32."""
        condition = self.prompt_embeds.expand(sample.shape[0], -1, -1).to(sample.dtype)
        with self._autocast(sample.device):
            return self.unet(sample, timestep, encoder_hidden_states=condition).sample.float()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> VAE posterior mean x scaling factor (deterministic latents)."""
        if images.ndim != 4:
            raise ValueError(f"extractor expects images (B, C, H, W), got shape {tuple(images.shape)}")
        if self.rgb_bands is not None:
            if max(self.rgb_bands) >= images.shape[1]:
                raise ValueError(
                    f"extractor rgb_bands {self.rgb_bands} out of range for {images.shape[1]} bands"
                )
            images = images[:, self.rgb_bands]
        elif images.shape[1] != 3:
            raise ValueError(
                f"the diffusion VAE needs 3 (RGB) bands but the images have {images.shape[1]}; select RGB bands "
                "in the datamodule or set model.init_args.extractor.init_args.rgb_bands"
            )
        low, high = float(images.min()), float(images.max())
        if low < -0.5 or high > 1.5:
            raise ValueError(
                f"extractor expects images in [0, 1] (min-max normalised), got values in [{low:.3g}, {high:.3g}]"
            )
        if self.image_size is not None and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            shrinking = min(images.shape[-2:]) > self.image_size
            images = F.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=shrinking,
            )
        with self._autocast(images.device):
            posterior = self.vae.encode(images * 2 - 1).latent_dist
        return posterior.mean.float() * self.vae.config.scaling_factor

    def _invert(self, latents: torch.Tensor, capture: bool) -> tuple[dict[int, torch.Tensor], list]:
        """DDIM inversion along ``self.path``; returns the noisy latents at the selected timesteps and, when
        ``capture``, the decoder maps read during the UNet call at each selected timestep (ascending).

        The clean latent stands for the sample at the path's first timestep (0 by default, where alpha_bar is
        0.9991): one UNet call per visited timestep, none at the last unless its maps are read."""
        selected = set(self.timesteps)
        noisy: dict[int, torch.Tensor] = {}
        captured = []
        sample, model_output = latents, None
        for position, timestep in enumerate(self.path):
            if model_output is not None:
                alpha_from = self.alphas_cumprod[self.path[position - 1]]
                sample = ddim_step(
                    sample, model_output, alpha_from, self.alphas_cumprod[timestep], self.prediction_type
                )
            if timestep in selected:
                noisy[timestep] = sample
            model_output = None
            if capture and timestep in selected:
                with self._capture() as maps:
                    model_output = self.predict(sample, timestep)
                captured.append(maps)
            elif position < len(self.path) - 1:
                model_output = self.predict(sample, timestep)
        return noisy, captured

    @torch.no_grad()
    def invert(self, latents: torch.Tensor) -> dict[int, torch.Tensor]:
        """The DDIM-inverted latents at each selected timestep (no features read)."""
        return self._invert(latents, capture=False)[0]

    def _pyramid(self, captured: list[list[list[torch.Tensor]]]) -> list[list[torch.Tensor]]:
        """Per-timestep maps -> the timestep-major pyramid of the contract."""
        return [
            [
                captured[t][level][index]
                for t in range(len(captured))
                for index in range(len(captured[t][level]))
            ]
            for level in range(PYRAMID_LEVELS)
        ]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        latents = self.encode(images)
        _, captured = self._invert(latents, capture=True)
        return self._pyramid(captured)

    @torch.no_grad()
    def noisy_latents(self, images: torch.Tensor) -> torch.Tensor:
        """The inverted latents at the selected timesteps, ``(B, T, C, h, w)`` (the latent cache tier)."""
        noisy = self.invert(self.encode(images))
        return torch.stack([noisy[t] for t in self.timesteps], dim=1)

    @torch.no_grad()
    def features_from_latents(self, noisy: torch.Tensor) -> list[list[torch.Tensor]]:
        """The pyramid from ``noisy_latents``: one hooked UNet call on the selected timesteps as one batch."""
        batch, steps = noisy.shape[:2]
        if steps != self.num_timesteps:
            raise ValueError(f"got latents at {steps} timesteps, the extractor selects {self.num_timesteps}")
        sample = noisy.transpose(0, 1).reshape(steps * batch, *noisy.shape[2:])
        timesteps = torch.tensor(self.timesteps, device=noisy.device).repeat_interleave(batch)
        with self._capture() as maps:
            self.predict(sample.float(), timesteps)
        return self._pyramid(
            [[[m[t * batch : (t + 1) * batch] for m in level] for level in maps] for t in range(steps)]
        )
