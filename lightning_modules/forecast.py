"""Sat-JEPA-Diff: I-JEPA forecasts t+1 semantics, which condition a frozen SD3 (LoRA) through an adapter."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from lightning_modules.forecast_task import ForecastTask
from lightning_modules.frozen import FrozenPartsCheckpointMixin
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
from networks.sd3 import SD3Backbone


def warmup_cosine(step: int, total: int, warmup: int, start: float, peak: float, end: float) -> float:
    """Linear from ``start`` to ``peak`` over ``warmup`` steps, then cosine from ``peak`` to ``end`` at ``total``."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ForecastModule(FrozenPartsCheckpointMixin, ForecastTask):
    """Sat-JEPA-Diff (Section 3, Appendix B) as one LightningModule; loss = L_IJEPA + diffusion_weight * L_diff.

    I-JEPA: the context encoder sees the masked last input frame x_t, the predictor predicts the target
    blocks; the hybrid loss compares their projection with the patch-pooled AlphaEarth embedding of t+1 and the
    predictor features with the EMA target encoder's features of frame t+1. The adapter always consumes the
    predictor's full-grid prediction (unmasked context, all positions), in training and at inference alike.

    Diffusion: target latents x0 = VAE(t+1), s from ``flow_matching``, x_s = (1 - s) x0 + s eps, the LoRA
    transformer predicts v conditioned on [prompt tokens; adapter tokens] and (CLIP pooled + adapter pooled)/2;
    L_diff = MSE(v, eps - x0) + ssim_weight * (1 - SSIM(decode(x_s - s v), t+1)), the SSIM term back-propagating
    through the frozen VAE decoder into LoRA, adapter and (unless ``detach_ijepa_for_diffusion``) I-JEPA. Invalid
    pixels take the target's value before SSIM, so they add no error.

    Forecast: the VAE latent of x_t is noised to ``flow_matching.strength`` and integrated with
    ``flow_matching.num_steps`` Euler steps (that many transformer calls), noise drawn from a generator seeded
    with ``sampling_seed`` on every call, so predictions are reproducible; decoded to [0, 1].

    Frozen SD3 transformer/VAE weights and the prompt embedding are rebuilt from config and never enter
    checkpoints or the optimizer; AdamW trains encoder, predictor, projection head, adapter and LoRA, with weight
    decay (cosine ``weight_decay`` -> ``final_weight_decay``) on matrices only, never on biases and norms.

    Args:
        backbone: ``SD3Backbone`` (``from_pretrained`` or ``from_config``).
        adapter: ``networks.adapter.ConditioningAdapter`` (coarse-only, ``semantic_dim: null``, without I-JEPA).
        encoder, predictor, projection_head: I-JEPA networks (``networks.ijepa``); null when ``use_ijepa`` is false.
        mask_generator, ijepa_loss, momentum: I-JEPA masking, hybrid loss and EMA momentum schedule.
        flow_matching: noise-level sampling and sampler settings.
        use_ijepa: false = the paper's "Stable Diffusion 3.5" row, conditioned on coarse x_t and the prompt only.
        train_diffusion: false trains the I-JEPA stage alone (validated by embedding cosine/L1 and std).
        detach_ijepa_for_diffusion: stop the diffusion gradient at the I-JEPA prediction.
        diffusion_weight, ssim_weight: lambda and lambda_ssim of the paper (1.0, 0.1).
        lr, warmup_start_lr, min_lr, warmup_epochs: linear warmup from ``warmup_start_lr`` to ``lr`` over
            ``warmup_epochs``, then cosine to ``min_lr`` at the end of training (per optimizer step).
        weight_decay, final_weight_decay, betas: AdamW settings (weight decay follows a cosine over training).
        sampling_seed: seed of the sampler's noise generator.
        gradient_checkpointing: recompute the activations of the SD3 transformer blocks (diffusers) and the I-JEPA
            encoder/predictor blocks (timm) in backward: less memory, about a third more compute.
        **kwargs: ``ForecastTask`` keys (history, metric weights, output folders, rollout_start).
    """

    frozen_module_names = ("backbone",)

    def __init__(
        self,
        backbone: nn.Module,
        adapter: nn.Module,
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
        lr: float = 1e-4,
        warmup_start_lr: float = 2e-5,
        min_lr: float = 1e-6,
        warmup_epochs: float = 1.0,
        weight_decay: float = 0.04,
        final_weight_decay: float = 0.4,
        betas: tuple[float, float] = (0.9, 0.999),
        sampling_seed: int = 0,
        gradient_checkpointing: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not isinstance(backbone, SD3Backbone):
            raise TypeError(f"config key 'backbone' must build an SD3Backbone, got {type(backbone).__name__}")
        if use_ijepa:
            missing = [
                key
                for key, value in {
                    "encoder": encoder,
                    "predictor": predictor,
                    "projection_head": projection_head,
                }.items()
                if value is None
            ]
            if missing:
                raise ValueError(f"use_ijepa is true but config keys {missing} are not set")
        elif not train_diffusion:
            raise ValueError("use_ijepa: false and train_diffusion: false leaves nothing to train")
        if gradient_checkpointing:
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
            self.mask_generator = mask_generator or MultiBlockMaskGenerator(grid_size=encoder.grid_size)
            self.ijepa_loss = ijepa_loss or HybridIJEPALoss()
            self.momentum = momentum or MomentumSchedule()
            self.patch_size = encoder.img_size // encoder.grid_size
        self.flow_matching = flow_matching or FlowMatching()
        self.train_diffusion = train_diffusion
        self.detach_ijepa_for_diffusion = detach_ijepa_for_diffusion
        self.diffusion_weight = diffusion_weight
        self.ssim_weight = ssim_weight
        self.lr = lr
        self.warmup_start_lr = warmup_start_lr
        self.min_lr = min_lr
        self.warmup_epochs = warmup_epochs
        self.weight_decay = weight_decay
        self.final_weight_decay = final_weight_decay
        self.betas = tuple(betas)
        self.sampling_seed = sampling_seed

    def model_name(self) -> str:
        return self.name or ("Sat-JEPA-Diff" if self.use_ijepa else "Stable Diffusion 3.5")

    # ----- I-JEPA ------------------------------------------------------------------------------------------
    def predict_semantics(self, frame: Tensor) -> Tensor:
        """Full-grid predicted t+1 tokens ``(B, N, D)`` from the unmasked frame x_t (what the adapter sees)."""
        return self.predictor(self.encoder(frame))

    def ijepa_terms(self, frame: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Hybrid I-JEPA loss terms on the target blocks of a freshly drawn multi-block mask."""
        context_indices, target_indices = (
            indices.to(frame.device) for indices in self.mask_generator(frame.shape[0])
        )
        context = self.encoder(frame, context_indices)
        pred_features = self.predictor(context, context_indices, target_indices)
        target_features = gather_tokens(self.target_encoder(batch["target"]), target_indices)
        target_embedding = gather_tokens(
            pool_patch_embedding(batch["embedding"], self.patch_size), target_indices
        )
        token_valid = patch_token_validity(batch["mask"], self.patch_size)
        token_valid = torch.gather(token_valid, 1, target_indices)
        return self.ijepa_loss(
            self.projection_head(pred_features),
            target_embedding,
            batch["has_embedding"],
            pred_features,
            target_features,
            token_valid,
        )

    # ----- diffusion ---------------------------------------------------------------------------------------
    def conditioning(self, semantics: Tensor | None, frame: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Joint tokens and pooled vector for the transformer, plus the adapter's fusion gate (or None)."""
        adapted = self.adapter(semantics, frame)
        tokens, pooled = self.backbone.conditioning(adapted.tokens, adapted.pooled)
        return tokens, pooled, adapted.gate

    def diffusion_terms(
        self, frame: Tensor, semantics: Tensor | None, batch: dict[str, Any]
    ) -> dict[str, Tensor]:
        """Flow-matching MSE and the SSIM term of the decoded clean estimate; ``total`` is their weighted sum."""
        target, mask = batch["target"], batch["mask"]
        with torch.no_grad():
            clean = self.backbone.encode(target)
        noise = torch.randn_like(clean)
        sigmas = self.flow_matching.sample_sigmas(clean.shape[0], clean.device)
        noisy = add_noise(clean, noise, sigmas)
        tokens, pooled, gate = self.conditioning(semantics, frame)
        velocity = self.backbone.velocity(noisy, sigmas, tokens, pooled)
        flow = flow_matching_loss(velocity, velocity_target(clean, noise))
        decoded = self.backbone.decode(clean_estimate(noisy, velocity, sigmas))
        ssim_loss = 1.0 - ssim(torch.where(mask[:, None], decoded, target), target)
        terms = {"flow": flow, "ssim": ssim_loss, "total": flow + self.ssim_weight * ssim_loss}
        if gate is not None:
            terms["gate"] = gate.detach().mean()
        return terms

    def forecast(self, image: Tensor) -> Tensor:
        frame = image[:, -1]
        semantics = self.predict_semantics(frame) if self.use_ijepa else None
        tokens, pooled, _ = self.conditioning(semantics, frame)
        generator = torch.Generator(device=frame.device).manual_seed(self.sampling_seed)
        latents = self.flow_matching.img2img(
            lambda noisy, sigmas: self.backbone.velocity(noisy, sigmas, tokens, pooled),
            self.backbone.encode(frame),
            generator,
        )
        return self.backbone.decode(latents).clamp(0.0, 1.0)

    # ----- training ----------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image = batch["image"]
        self.check_history(image)
        frame = image[:, -1]
        logs: dict[str, Tensor] = {}
        loss = frame.new_zeros(())
        semantics = None
        if self.use_ijepa:
            ijepa = self.ijepa_terms(frame, batch)
            logs.update({f"train/ijepa/{name}": value for name, value in ijepa.items()})
            loss = loss + ijepa["total"]
            if self.train_diffusion:
                semantics = self.predict_semantics(frame)
                if self.detach_ijepa_for_diffusion:
                    semantics = semantics.detach()
        if self.train_diffusion:
            diffusion = self.diffusion_terms(frame, semantics, batch)
            logs.update({f"train/diffusion/{name}": value for name, value in diffusion.items()})
            loss = loss + self.diffusion_weight * diffusion["total"]
        self.log_dict(logs, batch_size=image.shape[0])
        self.log("train/loss", loss, batch_size=image.shape[0], prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """EMA step of the target encoder after each optimizer step (momentum 0.999 -> 1 over training)."""
        if not self.use_ijepa:
            return
        momentum = self.momentum(self.global_step, max(int(self.trainer.estimated_stepping_batches), 1))
        self.target_encoder.update(self.encoder, momentum)
        self.log("train/ema_momentum", momentum)

    # ----- validation --------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        ijepa_loss = self.validate_ijepa(batch) if self.use_ijepa else None
        if self.train_diffusion:
            return super().validation_step(batch, batch_idx)
        self.log("val/loss", ijepa_loss, batch_size=batch["image"].shape[0], sync_dist=True, prog_bar=True)
        return ijepa_loss

    def on_validation_epoch_end(self) -> None:
        if self.train_diffusion:
            super().on_validation_epoch_end()

    def validate_ijepa(self, batch: dict[str, Any]) -> Tensor:
        """Full-grid I-JEPA checks: hybrid loss, embedding cosine/L1 and per-channel std (collapse check)."""
        frame = batch["image"][:, -1]
        features = self.predict_semantics(frame)
        embedding = self.projection_head(features)
        target_embedding = pool_patch_embedding(batch["embedding"], self.patch_size)
        token_valid = patch_token_validity(batch["mask"], self.patch_size)
        terms = self.ijepa_loss(
            embedding,
            target_embedding,
            batch["has_embedding"],
            features,
            self.target_encoder(batch["target"]),
            token_valid,
        )
        batch_size = frame.shape[0]
        logs = {f"val/ijepa/{name}": value for name, value in terms.items()}
        logs["val/ijepa/pred_std"] = embedding.std(dim=1).mean()
        with_embedding = token_valid & batch["has_embedding"].bool()[:, None]
        if with_embedding.any():
            cosine = torch.nn.functional.cosine_similarity(embedding, target_embedding, dim=-1)
            logs["val/ijepa/embedding_cosine"] = cosine[with_embedding].mean()
            logs["val/ijepa/embedding_l1"] = (
                (embedding - target_embedding).abs().mean(-1)[with_embedding].mean()
            )
            has = batch["has_embedding"].bool()
            logs["val/ijepa/target_std"] = target_embedding[has].std(dim=1).mean()
        self.log_dict(logs, batch_size=batch_size, sync_dist=True)
        return terms["total"]

    # ----- optimisation ------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.lr,
            betas=self.betas,
        )
        total, warmup = self.schedule_steps()
        scheduler = LambdaLR(
            optimizer,
            lambda step: (
                warmup_cosine(step, total, warmup, self.warmup_start_lr, self.lr, self.min_lr) / self.lr
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def schedule_steps(self) -> tuple[int, int]:
        """Total optimizer steps and warmup steps (``warmup_epochs`` of them) of this run."""
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ValueError("ForecastModule's schedules need trainer.max_epochs >= 1")
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return total, round(self.warmup_epochs * total / max_epochs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Cosine weight-decay schedule on the decayed parameter group (group 0)."""
        total, _ = self.schedule_steps()
        decay = warmup_cosine(
            self.global_step, total, 0, self.weight_decay, self.weight_decay, self.final_weight_decay
        )
        optimizer = self.optimizers().optimizer
        optimizer.param_groups[0]["weight_decay"] = decay
        self.log("train/weight_decay", decay)
        self.log("train/lr", optimizer.param_groups[0]["lr"])
