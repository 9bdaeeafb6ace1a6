"""Forecasting image metrics, one definition each, on ``(B, C, H, W)`` float images in [0, 1].

Built on torchmetrics' functional implementations. Every function returns the mean over the batch, or one score
per sample with ``reduction="none"`` (what the metric classes in ``metrics.forecast`` accumulate). ``ssim`` is
differentiable, so ``1 - ssim(pred, target)`` is the SSIM loss term of the forecasting models.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional import mean_absolute_error, mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

Reduction = Literal["elementwise_mean", "none"]

SSIM_KERNEL_SIZE = 11
SSIM_SIGMA = 1.5
GSSIM_SCALES = (1, 2, 4)
"""Downsampling factors of GSSIM: full, half and quarter resolution."""

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _check_pair(preds: Tensor, target: Tensor, name: str) -> None:
    if preds.ndim != 4 or preds.shape != target.shape:
        raise ValueError(
            f"{name}: expected preds and target of the same shape (B, C, H, W), "
            f"got {tuple(preds.shape)} and {tuple(target.shape)}"
        )


def _reduce(per_sample: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "elementwise_mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'elementwise_mean' or 'none', got {reduction!r}")


def l1(preds: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error over all pixels and channels."""
    _check_pair(preds, target, "l1")
    return mean_absolute_error(preds, target)


def mse(preds: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all pixels and channels."""
    _check_pair(preds, target, "mse")
    return mean_squared_error(preds, target)


def psnr(preds: Tensor, target: Tensor, reduction: Reduction = "elementwise_mean") -> Tensor:
    """PSNR in dB with data range 1, computed per image and then averaged over images (inf for a perfect image)."""
    _check_pair(preds, target, "psnr")
    per_sample = peak_signal_noise_ratio(preds, target, data_range=1.0, dim=(1, 2, 3), reduction="none")
    return _reduce(per_sample, reduction)


def ssim(preds: Tensor, target: Tensor, reduction: Reduction = "elementwise_mean") -> Tensor:
    """Differentiable SSIM with an 11x11 Gaussian window (sigma 1.5), data range 1, mean over channels.

    Identical to skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)``: the SSIM map is averaged over the pixels at least one window
    radius (5 px) from the border. torchmetrics' scalar also averages the reflect-padded border, so the full map
    is taken from torchmetrics and cropped here.
    """
    _check_pair(preds, target, "ssim")
    if min(preds.shape[-2:]) < SSIM_KERNEL_SIZE:
        raise ValueError(
            f"ssim: images must be at least {SSIM_KERNEL_SIZE}x{SSIM_KERNEL_SIZE} pixels, got {tuple(preds.shape[-2:])}"
        )
    _, ssim_map = structural_similarity_index_measure(
        preds,
        target,
        gaussian_kernel=True,
        sigma=SSIM_SIGMA,
        kernel_size=SSIM_KERNEL_SIZE,
        data_range=1.0,
        reduction="none",
        return_full_image=True,
    )
    radius = SSIM_KERNEL_SIZE // 2
    per_sample = ssim_map[..., radius:-radius, radius:-radius].mean(dim=(1, 2, 3))
    return _reduce(per_sample, reduction)


def sobel_magnitude(images: Tensor) -> Tensor:
    """Per-channel Sobel gradient magnitude ``sqrt(gx^2 + gy^2)`` with replicated borders; same size as input."""
    channels = images.shape[1]
    sobel_x = _SOBEL_X.to(dtype=images.dtype, device=images.device)
    kernels = torch.stack([sobel_x, sobel_x.T]).unsqueeze(1).repeat(channels, 1, 1, 1)
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    gradients = F.conv2d(padded, kernels, groups=channels)
    return torch.hypot(gradients[:, 0::2], gradients[:, 1::2])


def _min_max_normalise(images: Tensor) -> Tensor:
    """Scale each image to [0, 1]; a constant image becomes all zeros."""
    flat = images.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1, 1)
    return (images - low) / (high - low).clamp_min(torch.finfo(images.dtype).tiny)


def gssim(preds: Tensor, target: Tensor, reduction: Reduction = "elementwise_mean") -> Tensor:
    """Gradient SSIM, the structure/edge score of the Sat-JEPA-Diff evaluation.

    For each scale s in {1, 1/2, 1/4}: convert both images to grey (mean of the channels, i.e. of RGB),
    downsample by s with area averaging, take the Sobel gradient magnitude, min-max normalise each magnitude map
    to [0, 1] per image, and compute ``ssim`` (11x11 Gaussian, sigma 1.5, data range 1) between the two maps.
    GSSIM is the mean of the three SSIMs. It rewards sharp, correctly placed edges, which blurry forecasts lose.
    Needs images of at least 44x44 pixels so the quarter scale still holds an SSIM window.
    """
    _check_pair(preds, target, "gssim")
    coarsest = GSSIM_SCALES[-1]
    if min(preds.shape[-2:]) // coarsest < SSIM_KERNEL_SIZE:
        raise ValueError(
            f"gssim: images must be at least {coarsest * SSIM_KERNEL_SIZE} pixels on each side "
            f"(an {SSIM_KERNEL_SIZE}x{SSIM_KERNEL_SIZE} SSIM window at 1/{coarsest} scale), got {tuple(preds.shape[-2:])}"
        )
    grey_preds = preds.mean(dim=1, keepdim=True)
    grey_target = target.mean(dim=1, keepdim=True)
    per_scale = []
    for factor in GSSIM_SCALES:
        scaled_preds = F.avg_pool2d(grey_preds, factor) if factor > 1 else grey_preds
        scaled_target = F.avg_pool2d(grey_target, factor) if factor > 1 else grey_target
        edges_preds = _min_max_normalise(sobel_magnitude(scaled_preds))
        edges_target = _min_max_normalise(sobel_magnitude(scaled_target))
        per_scale.append(ssim(edges_preds, edges_target, reduction="none"))
    return _reduce(torch.stack(per_scale).mean(dim=0), reduction)
