"""Training losses: one definition each, shared by every module that needs them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``keep``; zero (still in the graph) when nothing is kept."""
    return values.where(keep, 0).sum() / keep.sum().clamp_min(1)


class HybridIJEPALoss(nn.Module):
    """Sat-JEPA-Diff's hybrid I-JEPA loss (Section 3, Appendix B.3), returned term by term for logging.

    Embedding terms compare projected predictions (B, N, C) with the patch-pooled AlphaEarth targets of t+1:
    ``l1`` (mean absolute error), ``cosine`` (1 - cosine similarity per token), ``spatial`` (squared mismatch of
    the per-channel standard deviation across a sample's tokens, against spatial collapse) and ``contrastive``
    (InfoNCE between per-sample mean tokens, other samples of the batch as negatives). Samples whose
    ``has_embedding`` is False and tokens whose ``token_valid`` is False are left out of these means, so they
    contribute nothing, and the terms are zero when no sample has an embedding. ``feature`` is the L1 distance
    between predictor outputs (B, N, D) and the target encoder's features of t+1, both layer-normed when
    ``normalize_features``; it uses every valid token. The dict holds the weighted sum under ``total`` and
    each unweighted term under its name.
    """

    def __init__(
        self,
        l1_weight: float = 20.0,
        cosine_weight: float = 2.0,
        spatial_weight: float = 2.0,
        contrastive_weight: float = 0.5,
        feature_weight: float = 5.0,
        temperature: float = 0.1,
        normalize_features: bool = True,
        std_eps: float = 1e-6,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"HybridIJEPALoss temperature must be > 0, got {temperature}")
        self.weights = {
            "l1": l1_weight,
            "cosine": cosine_weight,
            "spatial": spatial_weight,
            "contrastive": contrastive_weight,
            "feature": feature_weight,
        }
        self.temperature = temperature
        self.normalize_features = normalize_features
        self.std_eps = std_eps

    def forward(
        self,
        pred_embedding: torch.Tensor,
        target_embedding: torch.Tensor,
        has_embedding: torch.Tensor,
        pred_features: torch.Tensor,
        target_features: torch.Tensor,
        token_valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if pred_embedding.shape != target_embedding.shape or pred_features.shape != target_features.shape:
            raise ValueError(
                "HybridIJEPALoss: prediction/target shapes differ: embedding "
                f"{tuple(pred_embedding.shape)} vs {tuple(target_embedding.shape)}, features "
                f"{tuple(pred_features.shape)} vs {tuple(target_features.shape)}"
            )
        if has_embedding.shape != pred_embedding.shape[:1]:
            raise ValueError(
                f"HybridIJEPALoss: has_embedding must be ({pred_embedding.shape[0]},), got {tuple(has_embedding.shape)}"
            )
        if token_valid is None:
            token_valid = torch.ones(pred_features.shape[:2], dtype=torch.bool, device=pred_features.device)
        embedding_valid = token_valid & has_embedding.bool().unsqueeze(1)
        target_embedding = target_embedding.detach()
        terms = {
            "l1": _masked_mean((pred_embedding - target_embedding).abs().mean(-1), embedding_valid),
            "cosine": _masked_mean(
                1 - F.cosine_similarity(pred_embedding, target_embedding, dim=-1), embedding_valid
            ),
            "spatial": self.spatial_std_mismatch(pred_embedding, target_embedding, embedding_valid),
            "contrastive": self.info_nce(pred_embedding, target_embedding, embedding_valid),
            "feature": self.feature_regression(pred_features, target_features.detach(), token_valid),
        }
        terms["total"] = sum(self.weights[name] * terms[name] for name in self.weights)
        return terms

    def spatial_std_mismatch(
        self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Mean over channels and samples (with >= 2 valid tokens) of (std_pred - std_target)^2 across tokens."""
        count = valid.sum(1, keepdim=True)

        def token_std(tokens: torch.Tensor) -> torch.Tensor:
            tokens = tokens.where(valid.unsqueeze(-1), 0)
            mean = tokens.sum(1) / count.clamp_min(1)
            squares = ((tokens - mean.unsqueeze(1)) ** 2).where(valid.unsqueeze(-1), 0).sum(1)
            return torch.sqrt(squares / (count - 1).clamp_min(1) + self.std_eps)

        mismatch = ((token_std(pred) - token_std(target)) ** 2).mean(-1)
        return _masked_mean(mismatch, count.squeeze(1) >= 2)

    def info_nce(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """InfoNCE over samples with valid tokens: a sample's mean prediction must pick its own mean target."""
        count = valid.sum(1)
        samples = count > 0
        if int(samples.sum()) < 2:
            return pred.new_zeros(())

        def sample_means(tokens: torch.Tensor) -> torch.Tensor:
            means = tokens.where(valid.unsqueeze(-1), 0).sum(1) / count.clamp_min(1).unsqueeze(-1)
            return F.normalize(means[samples], dim=-1)

        logits = sample_means(pred) @ sample_means(target).T / self.temperature
        return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))

    def feature_regression(
        self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Per-token L1 to the EMA target features, layer-normed so the target's scale drift cannot dominate."""
        if self.normalize_features:
            pred = F.layer_norm(pred, pred.shape[-1:])
            target = F.layer_norm(target, target.shape[-1:])
        return _masked_mean((pred - target).abs().mean(-1), valid)


def flow_matching_loss(
    predicted_velocity: torch.Tensor, target_velocity: torch.Tensor, valid_cells: torch.Tensor | None = None
) -> torch.Tensor:
    """Rectified-flow loss of Sat-JEPA-Diff: MSE between predicted and target velocity (eps - x0), in float32.

    ``valid_cells`` ``(B, h, w)`` restricts it to latent cells whose pixels are all valid (a zero-filled nodata
    pixel is no target): the mean is over valid cells x channels; zero, still in the graph, if none is valid.
    """
    if predicted_velocity.shape != target_velocity.shape:
        raise ValueError(
            f"flow_matching_loss: velocity shapes differ: {tuple(predicted_velocity.shape)} vs "
            f"{tuple(target_velocity.shape)}"
        )
    error = (predicted_velocity.float() - target_velocity.float()) ** 2
    if valid_cells is None:
        return error.mean()
    expected = (error.shape[0], *error.shape[2:])
    if tuple(valid_cells.shape) != expected:
        raise ValueError(
            f"flow_matching_loss: valid_cells must be {expected}, got {tuple(valid_cells.shape)}"
        )
    return _masked_mean(error, valid_cells.unsqueeze(1).expand_as(error))
