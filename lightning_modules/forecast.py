"""Sat-JEPA-Diff: I-JEPA forecasts t+1 semantics, which condition a frozen SD3 (LoRA) through an adapter."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_modules.forecast_task import ForecastTask, sample_keys
from lightning_modules.frozen import FrozenPartsCheckpointMixin
from lightning_modules.schedules import warmup_cosine
from metrics.functional import ssim
from metrics.losses import HybridIJEPALoss, flow_matching_loss
from networks.flow_matching import FlowMatching, add_noise, clean_estimate, velocity_target
from networks.ijepa import (
    EMATargetEncoder,
    MomentumSchedule,
    MultiBlockMaskGenerator,
    gather_tokens,
    patch_token_validity,
    pool_patch_embedding,
)
from networks.sd3 import LatentCache, SD3Backbone

MODEL_KEY = "model.init_args"
EMBEDDING_METRICS = ("embedding_cosine", "embedding_l1", "pred_std", "target_std")
"""What the I-JEPA-only model reports at validation and test (no image is generated)."""


def paper_adamw(params) -> torch.optim.Optimizer:
    """Appendix B's optimiser: AdamW, peak learning rate 1e-4, initial weight decay 0.04."""
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.04)


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` via SHA-256: identical in every process (Python's ``hash`` is salted)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def stable_uniform(*parts: Any) -> float:
    """A number in [0, 1) fixed by ``parts`` (used to pick a seeded subset of windows)."""
    return stable_seed(*parts) / 2**63


def pixel_keys(frame: Tensor) -> list[str]:
    """One identity per sample from its input pixels, for batches that do not name their windows."""
    return [hashlib.sha256(sample.tobytes()).hexdigest() for sample in frame.detach().float().cpu().numpy()]


def run_seed() -> int:
    """The run's ``seed_everything`` seed (the same in every DDP process; 0 when the run was not seeded)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def grid_mismatches(
    encoder: nn.Module,
    predictor: nn.Module | None,
    projection_head: nn.Module | None,
    mask_generator: MultiBlockMaskGenerator | None,
    adapter: nn.Module | None,
    backbone: SD3Backbone | None,
    use_ijepa: bool,
) -> list[str]:
    """Every disagreement between the networks' token grids and widths, each naming the config keys."""
    problems = []

    def check(key: str, value: Any, expected: Any, source: str) -> None:
        if value != expected:
            problems.append(f"{MODEL_KEY}.{key}={value} but {source} is {expected}")

    if use_ijepa:
        grid = f"the encoder's grid ({MODEL_KEY}.encoder.init_args.img_size / patch_size)"
        width = f"{MODEL_KEY}.encoder.init_args.embed_dim"
        check("predictor.init_args.grid_size", predictor.grid_size, encoder.grid_size, grid)
        check("predictor.init_args.in_dim", predictor.in_dim, encoder.embed_dim, width)
        check("predictor.init_args.out_dim", predictor.out_dim, encoder.embed_dim, width)
        check(
            "projection_head.init_args.in_dim",
            projection_head.proj.in_features,
            predictor.out_dim,
            f"{MODEL_KEY}.predictor.init_args.out_dim",
        )
        if mask_generator is not None:
            check("mask_generator.init_args.grid_size", mask_generator.grid_size, encoder.grid_size, grid)
        if adapter is not None:
            check("adapter.init_args.semantic_grid", adapter.semantic_grid, encoder.grid_size, grid)
            check(
                "adapter.init_args.semantic_dim",
                adapter.semantic_dim,
                predictor.out_dim,
                f"{MODEL_KEY}.predictor.init_args.out_dim",
            )
    elif adapter is not None:
        check("adapter.init_args.semantic_dim", adapter.semantic_dim, None, "use_ijepa: false, so it")
    if adapter is not None and backbone is not None:
        transformer = f"the transformer's ({MODEL_KEY}.backbone)"
        check(
            "adapter.init_args.joint_dim", adapter.joint_dim, backbone.joint_dim, f"{transformer} joint dim"
        )
        check(
            "adapter.init_args.pooled_dim",
            adapter.pooled_dim,
            backbone.pooled_dim,
            f"{transformer} pooled dim",
        )
    return problems


class ForecastModule(FrozenPartsCheckpointMixin, ForecastTask):
    """Sat-JEPA-Diff (Section 3, Appendix B) as one LightningModule; loss = L_IJEPA + diffusion_weight * L_diff.

    I-JEPA: the context encoder sees the masked last input frame x_t, the predictor predicts the target
    blocks; the hybrid loss compares their projection with the patch-pooled AlphaEarth embedding of t+1 and the
    predictor features with the EMA target encoder's features of frame t+1. The adapter always consumes the
    predictor's full-grid prediction (unmasked context, all positions), in training and at inference alike, so
    the hybrid loss is applied to that full-grid prediction too (``full_grid_weight``): otherwise only the
    diffusion gradient would reach what the adapter and validation actually see. The target encoder makes one
    EMA step per optimizer step (in ``optimizer_step``, so a checkpoint saved at that batch's end holds it).

    Diffusion: target latents x0 = VAE(t+1), s from ``flow_matching``, x_s = (1 - s) x0 + s eps, the LoRA
    transformer predicts v conditioned on [prompt tokens; adapter tokens] and (CLIP pooled + adapter pooled)/2;
    L_diff = MSE(v, eps - x0) + ssim_weight * (1 - SSIM(decode(x_s - s v), t+1)). The MSE is taken over latent
    cells whose pixels are all valid; the SSIM term back-propagates through the frozen VAE decoder into LoRA,
    adapter and (unless ``detach_ijepa_for_diffusion``) I-JEPA, with invalid pixels taking the target's value.

    Forecast: the VAE latent of x_t is noised to ``flow_matching.strength`` and integrated with
    ``flow_matching.num_steps`` Euler steps. Each sample's noise is drawn from its own generator seeded with
    (``sampling_seed``, region, window, target time, rollout step), so a forecast does not depend on the batch
    it is in or on the DDP layout, and differs between samples and rollout steps; samples without those keys
    (direct calls) are seeded from their input pixels instead.

    Training draws (I-JEPA block positions, noise levels s, noise eps) come from generators seeded per sample by
    (run seed, global step, sample identity), the blocks' sizes from one seeded by (run seed, global step): a
    sample draws the same values in any batch and after a restart, so 2 DDP ranks with batch b train like one
    process with batch 2b, while different samples (hence ranks) and steps draw different values. The adapter's
    reference dropout and the ``ssim_subset`` choice are per-batch draws from each rank's own global stream.

    I-JEPA-only mode (``train_diffusion: false``, ``backbone``/``adapter`` null, configs/ijepa_only.yaml):
    nothing of SD3.5 is built; validation and test report the embedding metrics (cosine, L1, per-channel std)
    under ``val|test/ijepa/``, and the test row is named "<name> (I-JEPA only)".

    Frozen SD3 transformer/VAE weights and the prompt embedding are rebuilt from config and never enter
    checkpoints or the optimizer; the optimizer (AdamW) trains encoder, predictor, projection head, adapter and
    LoRA, with weight decay (cosine from the optimizer's ``weight_decay`` to ``final_weight_decay``) on matrices
    only, never on biases and norms.

    Args:
        backbone: ``SD3Backbone`` (``from_pretrained`` or ``from_config``); null in the I-JEPA-only mode.
        adapter: ``networks.adapter.ConditioningAdapter`` (coarse-only, ``semantic_dim: null``, without I-JEPA);
            null in the I-JEPA-only mode.
        encoder, predictor, projection_head: I-JEPA networks (``networks.ijepa``); null when ``use_ijepa`` is false.
        mask_generator, ijepa_loss, momentum: I-JEPA masking (its ``grid_size`` defaults to the encoder's grid),
            hybrid loss and EMA momentum schedule.
        flow_matching: noise-level sampling and sampler settings.
        use_ijepa: false = the paper's "Stable Diffusion 3.5" row, conditioned on coarse x_t and the prompt only.
        train_diffusion: false trains the I-JEPA stage alone (needs ``backbone`` and ``adapter`` null).
        detach_ijepa_for_diffusion: stop the diffusion gradient at the I-JEPA prediction.
        diffusion_weight, ssim_weight: lambda and lambda_ssim of the paper (1.0, 0.1).
        full_grid_weight: weight of the hybrid loss on the full-grid prediction (0 = the paper's masked-only).
        ssim_subset: decode only this many samples of each batch (a random subset from the seeded global
            generator) for the SSIM term: an unbiased estimate of the batch mean at ``ssim_subset / B`` of the
            decoder's cost; null decodes every sample.
        ssim_decode_bf16: decode for the SSIM term under bf16 autocast instead of float32 (faster on GPUs).
        latent_cache: ``networks.sd3.LatentCache`` for the target latents of fixed windows (null: encode every
            batch; random-crop training never hits it).
        optimizer: builds the optimizer from two parameter groups (matrices with the optimizer's weight decay,
            biases and norms without); default AdamW, lr 1e-4, betas (0.9, 0.999), weight decay 0.04.
        warmup_start_lr, min_lr, warmup_epochs: linear warmup from ``warmup_start_lr`` to the optimizer's lr over
            ``warmup_epochs`` epochs of optimizer steps, then cosine to ``min_lr`` at the last optimizer step
            (``BaseTask``'s schedule).
        final_weight_decay: the weight decay of the matrices at the last optimizer step (cosine from the
            optimizer's ``weight_decay``).
        sampling_seed: seed of the sampler's per-sample noise (and of the validation subset).
        val_subset_windows: sample forecasts for only about this many validation windows per epoch (a fixed
            subset, seeded by ``sampling_seed``; the others are skipped), and for all of them at the last epoch
            (or when ``max_steps`` is reached); null validates every window every epoch.
        gradient_checkpointing: recompute the activations of the SD3 transformer blocks (diffusers) and the I-JEPA
            encoder/predictor blocks (timm) in backward: less memory, about a third more compute.
        **kwargs: ``ForecastTask`` keys (history, metric weights, output folders, rollout_start).
    """

    frozen_module_names = ("backbone",)
    eval_module_names = ("target_encoder",)

    def __init__(
        self,
        backbone: nn.Module | None = None,
        adapter: nn.Module | None = None,
        encoder: nn.Module | None = None,
        predictor: nn.Module | None = None,
        projection_head: nn.Module | None = None,
        mask_generator: MultiBlockMaskGenerator | None = None,
        ijepa_loss: HybridIJEPALoss | None = None,
        momentum: MomentumSchedule | None = None,
        flow_matching: FlowMatching | None = None,
        use_ijepa: bool = True,
        train_diffusion: bool = True,
        detach_ijepa_for_diffusion: bool = False,
        diffusion_weight: float = 1.0,
        ssim_weight: float = 0.1,
        full_grid_weight: float = 1.0,
        ssim_subset: int | None = None,
        ssim_decode_bf16: bool = False,
        latent_cache: LatentCache | None = None,
        optimizer: OptimizerCallable = paper_adamw,
        warmup_start_lr: float = 2e-5,
        min_lr: float = 1e-6,
        warmup_epochs: float | None = 1.0,
        final_weight_decay: float = 0.4,
        sampling_seed: int = 0,
        val_subset_windows: int | None = None,
        gradient_checkpointing: bool = False,
        **kwargs: Any,
    ):
        super().__init__(
            optimizer=optimizer,
            warmup_epochs=warmup_epochs,
            warmup_start_lr=warmup_start_lr,
            min_lr=min_lr,
            **kwargs,
        )
        self.check_parts(backbone, adapter, encoder, predictor, projection_head, use_ijepa, train_diffusion)
        if use_ijepa:
            mask_generator = mask_generator or MultiBlockMaskGenerator()
            if mask_generator.grid_size is None:  # configured once, on the encoder
                mask_generator.set_grid_size(encoder.grid_size)
        problems = grid_mismatches(
            encoder, predictor, projection_head, mask_generator, adapter, backbone, use_ijepa
        )
        if problems:
            raise ValueError("mismatched networks: " + "; ".join(problems))
        if ssim_subset is not None and ssim_subset < 1:
            raise ValueError(f"config key '{MODEL_KEY}.ssim_subset' must be >= 1 or null, got {ssim_subset}")
        if val_subset_windows is not None and val_subset_windows < 1:
            raise ValueError(
                f"config key '{MODEL_KEY}.val_subset_windows' must be >= 1 or null, got {val_subset_windows}"
            )
        if gradient_checkpointing:
            if backbone is not None:
                backbone.transformer.enable_gradient_checkpointing()
            if use_ijepa:
                encoder.set_grad_checkpointing()
                predictor.set_grad_checkpointing()
        self.backbone = backbone
        self.adapter = adapter
        self.use_ijepa = use_ijepa
        if use_ijepa:
            self.encoder = encoder
            self.predictor = predictor
            self.projection_head = projection_head
            self.target_encoder = EMATargetEncoder(encoder)
            self.mask_generator = mask_generator
            self.ijepa_loss = ijepa_loss or HybridIJEPALoss()
            self.momentum = momentum or MomentumSchedule()
            self.patch_size = encoder.img_size // encoder.grid_size
        self.flow_matching = flow_matching or FlowMatching()
        self.train_diffusion = train_diffusion
        self.detach_ijepa_for_diffusion = detach_ijepa_for_diffusion
        self.diffusion_weight = diffusion_weight
        self.ssim_weight = ssim_weight
        self.full_grid_weight = full_grid_weight
        self.ssim_subset = ssim_subset
        self.ssim_decode_bf16 = ssim_decode_bf16
        self.latent_cache = latent_cache
        self.final_weight_decay = final_weight_decay
        self.sampling_seed = sampling_seed
        self.val_subset_windows = val_subset_windows
        if not train_diffusion:
            self.embedding_test_means = nn.ModuleDict({name: MeanMetric() for name in EMBEDDING_METRICS})

    @staticmethod
    def check_parts(
        backbone, adapter, encoder, predictor, projection_head, use_ijepa, train_diffusion
    ) -> None:
        """Which networks each mode needs (and, for the I-JEPA-only mode, must not build)."""
        if use_ijepa:
            parts = {"encoder": encoder, "predictor": predictor, "projection_head": projection_head}
            missing = [key for key, value in parts.items() if value is None]
            if missing:
                raise ValueError(f"use_ijepa is true but config keys {missing} are not set")
        elif not train_diffusion:
            raise ValueError("use_ijepa: false and train_diffusion: false leaves nothing to train")
        if train_diffusion:
            if not isinstance(backbone, SD3Backbone):
                raise TypeError(
                    f"config key '{MODEL_KEY}.backbone' must build an SD3Backbone, got {type(backbone).__name__}"
                )
            if adapter is None:
                raise ValueError(f"config key '{MODEL_KEY}.adapter' is not set (needed with train_diffusion)")
        elif backbone is not None or adapter is not None:
            raise ValueError(
                "train_diffusion: false trains the I-JEPA stage alone: set backbone: null and adapter: null so "
                "SD3.5 is not loaded (see configs/ijepa_only.yaml)"
            )

    def model_name(self) -> str:
        if not self.train_diffusion:
            return f"{self.name or 'Sat-JEPA-Diff'} (I-JEPA only)"
        return self.name or ("Sat-JEPA-Diff" if self.use_ijepa else "Stable Diffusion 3.5")

    def setup(self, stage: str) -> None:
        """The data's window size must be the encoder's image size (one clear line, before any batch)."""
        patch_size = getattr(getattr(self.trainer, "datamodule", None), "patch_size", None)
        if self.use_ijepa and patch_size is not None and patch_size != self.encoder.img_size:
            raise ValueError(
                f"data.init_args.patch_size={patch_size} but {MODEL_KEY}.encoder.init_args.img_size="
                f"{self.encoder.img_size}: the I-JEPA encoder's image size must be the window size"
            )

    # ----- I-JEPA ------------------------------------------------------------------------------------------
    def predict_semantics(self, frame: Tensor) -> Tensor:
        """Full-grid predicted t+1 tokens ``(B, N, D)`` from the unmasked frame x_t (what the adapter sees)."""
        return self.predictor(self.encoder(frame))

    def embedding_tokens(self, batch: dict[str, Any], like: Tensor, indices: Tensor | None = None) -> Tensor:
        """Pooled AlphaEarth targets shaped like the projected prediction ``like`` (gathered at ``indices``);
        zeros, left out through ``has_embedding``, when the batch has no ``embedding`` (no embedding files)."""
        if "embedding" not in batch:
            return torch.zeros_like(like)
        data_pool = batch["image"].shape[-1] // batch["embedding"].shape[-1]  # the loader's pre-pooling
        if self.patch_size % data_pool:
            raise ValueError(
                f"data.init_args.embedding_patch_size={data_pool} must divide the encoder's patch size "
                f"{self.patch_size} ({MODEL_KEY}.encoder.init_args.patch_size)"
            )
        tokens = pool_patch_embedding(batch["embedding"], self.patch_size // data_pool)
        return tokens if indices is None else gather_tokens(tokens, indices)

    def ijepa_terms(self, frame: Tensor, batch: dict[str, Any], target_features: Tensor) -> dict[str, Tensor]:
        """Hybrid I-JEPA loss terms on the target blocks of a freshly drawn multi-block mask."""
        context_indices, target_indices = (
            indices.to(frame.device)
            for indices in self.mask_generator(
                frame.shape[0], self.step_generator("mask shapes"), self.sample_generators(batch, "mask")
            )
        )
        context = self.encoder(frame, context_indices)
        pred_features = self.predictor(context, context_indices, target_indices)
        projected = self.projection_head(pred_features)
        target_embedding = self.embedding_tokens(batch, projected, target_indices)
        token_valid = patch_token_validity(batch["mask"], self.patch_size)
        token_valid = torch.gather(token_valid, 1, target_indices)
        return self.ijepa_loss(
            projected,
            target_embedding,
            batch["has_embedding"],
            pred_features,
            gather_tokens(target_features, target_indices),
            token_valid,
        )

    def full_grid_terms(
        self, semantics: Tensor, batch: dict[str, Any], target_features: Tensor
    ) -> dict[str, Tensor]:
        """Hybrid I-JEPA loss terms on the full-grid prediction ``semantics`` (the adapter's input)."""
        projected = self.projection_head(semantics)
        return self.ijepa_loss(
            projected,
            self.embedding_tokens(batch, projected),
            batch["has_embedding"],
            semantics,
            target_features,
            patch_token_validity(batch["mask"], self.patch_size),
        )

    # ----- diffusion (each part callable alone: bench/forecast_step.py times them) -------------------------
    def conditioning(self, semantics: Tensor | None, frame: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Joint tokens and pooled vector for the transformer, plus the adapter's fusion gate (or None)."""
        adapted = self.adapter(semantics, frame)
        tokens, pooled = self.backbone.conditioning(adapted.tokens, adapted.pooled)
        return tokens, pooled, adapted.gate

    def latent_validity(self, mask: Tensor, latents: Tensor) -> Tensor:
        """Latent cells ``(B, h, w)`` whose pixels are all valid (a nodata pixel spoils the cell it falls in)."""
        cell = mask.shape[-1] // latents.shape[-1]
        return patch_token_validity(mask, cell).view(mask.shape[0], *latents.shape[-2:])

    def ssim_term(self, noisy: Tensor, velocity: Tensor, sigmas: Tensor, batch: dict[str, Any]) -> Tensor:
        """1 - SSIM of the decoded clean estimate, on ``ssim_subset`` random samples (unbiased for the mean)."""
        target, mask = batch["target"], batch["mask"]
        if self.ssim_subset is not None and self.ssim_subset < target.shape[0]:
            chosen = torch.randperm(target.shape[0])[: self.ssim_subset].to(target.device)
            noisy, velocity, sigmas, target, mask = (
                t.index_select(0, chosen) for t in (noisy, velocity, sigmas, target, mask)
            )
        estimate = clean_estimate(noisy, velocity, sigmas)
        decoded = self.backbone.decode(
            estimate, autocast_dtype=torch.bfloat16 if self.ssim_decode_bf16 else None
        )
        return 1.0 - ssim(torch.where(mask[:, None], decoded.float(), target), target)

    def target_latents(self, batch: dict[str, Any]) -> Tensor:
        """VAE latents of the targets (from ``latent_cache`` where the batch names its windows)."""
        keys = sample_keys(batch, step=0)  # step 0: the real target frame itself
        if self.latent_cache is not None and keys is not None:
            return self.latent_cache.encode(self.backbone, batch["target"], keys)
        with torch.no_grad():
            return self.backbone.encode(batch["target"])

    def diffusion_terms(
        self, frame: Tensor, semantics: Tensor | None, batch: dict[str, Any]
    ) -> dict[str, Tensor]:
        """Flow-matching MSE (valid latent cells) and the SSIM term; ``total`` is their weighted sum."""
        clean = self.target_latents(batch)
        noise = torch.stack(
            [torch.randn(clean.shape[1:], generator=g) for g in self.sample_generators(batch, "noise")]
        ).to(clean)
        cpu = torch.device("cpu")
        sigmas = torch.cat(
            [self.flow_matching.sample_sigmas(1, cpu, g) for g in self.sample_generators(batch, "sigma")]
        ).to(clean.device)
        noisy = add_noise(clean, noise, sigmas)
        tokens, pooled, gate = self.conditioning(semantics, frame)
        velocity = self.backbone.velocity(noisy, sigmas, tokens, pooled)
        flow = flow_matching_loss(
            velocity, velocity_target(clean, noise), self.latent_validity(batch["mask"], clean)
        )
        ssim_loss = self.ssim_term(noisy, velocity, sigmas, batch)
        terms = {"flow": flow, "ssim": ssim_loss, "total": flow + self.ssim_weight * ssim_loss}
        if gate is not None:
            terms["gate"] = gate.detach().mean()
        return terms

    def sampling_noise(self, frame: Tensor, latent_shape: torch.Size, keys: list[str] | None) -> Tensor:
        """One noise tensor per sample from its own generator (see the class docstring), on ``frame``'s device."""
        if keys is None:  # no identities: seed each sample from its own input pixels
            keys = pixel_keys(frame)
        if len(keys) != latent_shape[0]:
            raise ValueError(f"got {len(keys)} sample keys for a batch of {latent_shape[0]}")
        noise = [
            torch.randn(
                latent_shape[1:],
                generator=torch.Generator().manual_seed(stable_seed(self.sampling_seed, key)),
            )
            for key in keys
        ]
        return torch.stack(noise).to(frame.device)

    def forecast(self, image: Tensor, sample_keys: list[str] | None = None) -> Tensor:
        if self.backbone is None:
            raise ValueError(
                "this is the I-JEPA-only model (train_diffusion: false): it forecasts embeddings, not images; "
                "test reports its embedding metrics and predict is not available"
            )
        frame = image[:, -1]
        semantics = self.predict_semantics(frame) if self.use_ijepa else None
        tokens, pooled, _ = self.conditioning(semantics, frame)
        start = self.backbone.encode(frame)
        latents = self.flow_matching.img2img(
            lambda noisy, sigmas: self.backbone.velocity(noisy, sigmas, tokens, pooled),
            start,
            self.sampling_noise(frame, start.shape, sample_keys),
        )
        return self.backbone.decode(latents).clamp(0.0, 1.0)

    def forecast_samples(self, image: Tensor, sample_keys: list[str] | None) -> Tensor:
        return self.forecast(image, sample_keys)

    # ----- training ----------------------------------------------------------------------------------------
    def sample_generators(self, batch: dict[str, Any], draw: str) -> list[torch.Generator]:
        """One CPU generator per sample for the training draw ``draw``, seeded by (run seed, global step,
        ``draw``, the sample's window identity, or its input pixels where the batch does not name its windows)."""
        keys = sample_keys(batch) or pixel_keys(batch["image"][:, -1])
        return [
            torch.Generator().manual_seed(stable_seed(run_seed(), "train", self.global_step, draw, key))
            for key in keys
        ]

    def step_generator(self, draw: str) -> torch.Generator:
        """A CPU generator for a per-batch training draw, the same in every DDP process at this step."""
        return torch.Generator().manual_seed(stable_seed(run_seed(), "train", self.global_step, draw))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image = batch["image"]
        self.check_history(image)
        frame = image[:, -1]
        logs: dict[str, Tensor] = {}
        loss = frame.new_zeros(())
        semantics = None
        if self.use_ijepa:
            target_features = self.target_encoder(batch["target"])
            ijepa = self.ijepa_terms(frame, batch, target_features)
            logs.update({f"train/ijepa/{name}": value for name, value in ijepa.items()})
            loss = loss + ijepa["total"]
            if self.train_diffusion or self.full_grid_weight > 0:
                semantics = self.predict_semantics(frame)
            if self.full_grid_weight > 0:
                full_grid = self.full_grid_terms(semantics, batch, target_features)
                logs.update({f"train/ijepa_full_grid/{name}": value for name, value in full_grid.items()})
                loss = loss + self.full_grid_weight * full_grid["total"]
            if self.train_diffusion and self.detach_ijepa_for_diffusion:
                semantics = semantics.detach()
        if self.train_diffusion:
            diffusion = self.diffusion_terms(frame, semantics, batch)
            logs.update({f"train/diffusion/{name}": value for name, value in diffusion.items()})
            loss = loss + self.diffusion_weight * diffusion["total"]
        self.log_dict(logs, batch_size=image.shape[0])
        self.log("train/loss", loss, batch_size=image.shape[0], prog_bar=True)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Step, then one EMA step of the target encoder (momentum 0.999 -> 1 over the optimizer steps).

        Here, not in ``on_train_batch_end``: this runs once per optimizer step (not per accumulated micro-batch)
        and before the callbacks' batch-end hooks, so a checkpoint saved at this batch's end contains it.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if not self.use_ijepa:
            return
        momentum = self.momentum(self.global_step, self.schedule_steps()[0])
        self.target_encoder.update(self.encoder, momentum)
        self.log("train/ema_momentum", momentum)

    # ----- validation and test -----------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        ijepa_loss = self.validate_ijepa(batch, "val") if self.use_ijepa else None
        if not self.train_diffusion:
            self.log(
                "val/loss", ijepa_loss, batch_size=batch["image"].shape[0], sync_dist=True, prog_bar=True
            )
            return ijepa_loss
        subset = self.validation_subset(batch)
        if subset is None:  # a zero-weight entry keeps val/loss on every rank for the DDP reduction
            self.log("val/loss", batch["image"].new_zeros(()), batch_size=0, sync_dist=True, prog_bar=True)
            return None
        return super().validation_step(subset, batch_idx)

    def validation_subset(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """The batch's windows in this epoch's sampled subset (``val_subset_windows``), None if it has none."""
        if self.val_subset_windows is None or self.is_final_validation():
            return batch
        keys = sample_keys(batch)
        if keys is None:
            raise ValueError(
                f"{MODEL_KEY}.val_subset_windows needs batches with region/transform/target_time"
            )
        total = len(self.trainer.val_dataloaders.dataset)
        keep = [
            stable_uniform(self.sampling_seed, "val", key) * total < self.val_subset_windows for key in keys
        ]
        if all(keep):
            return batch
        if not any(keep):
            return None
        index = torch.tensor([i for i, k in enumerate(keep) if k], device=batch["image"].device)
        return {
            key: value.index_select(0, index)
            if isinstance(value, Tensor)
            else [value[i] for i in index.tolist()]
            for key, value in batch.items()
        }

    def is_final_validation(self) -> bool:
        """The last epoch's validation (or the one at ``max_steps``), where every window is sampled."""
        trainer = self.trainer
        if trainer.sanity_checking:
            return False
        last_epoch = trainer.max_epochs not in (None, -1) and self.current_epoch >= trainer.max_epochs - 1
        return last_epoch or (trainer.max_steps not in (None, -1) and self.global_step >= trainer.max_steps)

    def on_validation_epoch_end(self) -> None:
        if self.train_diffusion:
            super().on_validation_epoch_end()

    def embedding_metrics(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Full-grid hybrid loss terms, and embedding cosine/L1 (tokens with a target) and per-channel std
        (collapse check), from the prediction the adapter consumes."""
        features = self.predict_semantics(batch["image"][:, -1])
        embedding = self.projection_head(features)
        target_embedding = self.embedding_tokens(batch, embedding)
        token_valid = patch_token_validity(batch["mask"], self.patch_size)
        terms = self.full_grid_terms(features, batch, self.target_encoder(batch["target"]))
        metrics = {"pred_std": embedding.std(dim=1).mean()}
        has = batch["has_embedding"].bool()
        with_embedding = token_valid & has[:, None]
        if with_embedding.any():
            cosine = torch.nn.functional.cosine_similarity(embedding, target_embedding, dim=-1)
            metrics["embedding_cosine"] = cosine[with_embedding].mean()
            metrics["embedding_l1"] = (embedding - target_embedding).abs().mean(-1)[with_embedding].mean()
            metrics["target_std"] = target_embedding[has].std(dim=1).mean()
        return terms, metrics

    def validate_ijepa(self, batch: dict[str, Any], split: str) -> Tensor:
        terms, metrics = self.embedding_metrics(batch)
        logs = {f"{split}/ijepa/{name}": value for name, value in {**terms, **metrics}.items()}
        self.log_dict(logs, batch_size=batch["image"].shape[0], sync_dist=True)
        return terms["total"]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.train_diffusion:
            return super().test_step(batch, batch_idx)
        if "images" in batch:
            raise ValueError(
                "the I-JEPA-only model is tested on single-step batches: set data `sequence: false`"
            )
        _, metrics = self.embedding_metrics(batch)
        for name, value in metrics.items():
            self.embedding_test_means[name].update(value, weight=batch["image"].shape[0])

    def on_test_epoch_end(self) -> None:
        if self.train_diffusion:
            return super().on_test_epoch_end()
        values = {
            f"test/ijepa/{name}": value
            for name, value in self.epoch_metrics(self.embedding_test_means).items()
        }
        self.log_dict(values)
        if self.trainer.is_global_zero:
            row = ", ".join(f"{key.rsplit('/', 1)[-1]} {float(value):.4f}" for key, value in values.items())
            print(f"{self.model_name()}: {row}")

    # ----- optimisation ------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Matrices (group 0, the optimizer's weight decay) and biases/norms (group 1, no weight decay)."""
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Cosine weight-decay schedule over the optimizer steps on the decayed parameter group (group 0)."""
        total, _ = self.schedule_steps()
        optimizer = self.optimizers().optimizer
        initial = optimizer.defaults["weight_decay"]
        decay = warmup_cosine(self.global_step, total, 0, initial, initial, self.final_weight_decay)
        optimizer.param_groups[0]["weight_decay"] = decay
        self.log("train/weight_decay", decay)
        self.log("train/lr", optimizer.param_groups[0]["lr"])
