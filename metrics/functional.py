"""Forecasting image metrics, one definition each, on ``(B, C, H, W)`` float images in [0, 1].

Every metric scores valid pixels only: ``mask`` ``(B, H, W)`` is True where both images hold real data (the
forecasting batch's ``mask``), and ``owned`` ``(B, H, W)`` optionally restricts which valid pixels are counted
(overlapping grid windows own each pixel once). Invalid pixels are never copied from one image into the
other, so a hole adds no artificial agreement. L1/MSE average over the counted pixels; PSNR comes from each
image's counted-pixel MSE; SSIM averages its map over counted pixels whose 11x11 window is fully valid; GSSIM
(like LPIPS and FID in ``metrics.forecast``) scores only fully valid images. A sample with nothing to score is
NaN with ``reduction="none"`` and left out of the mean. ``ssim`` is differentiable, so
``1 - ssim(pred, target)`` is the SSIM loss term of the forecasting models. Any strides are accepted.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

Reduction = Literal["elementwise_mean", "none"]

SSIM_KERNEL_SIZE = 11
SSIM_SIGMA = 1.5
GSSIM_SCALES = (1, 2, 4)
"""Downsampling factors of GSSIM: full, half and quarter resolution."""

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _check_pair(preds: Tensor, target: Tensor, name: str, *masks: Tensor | None) -> None:
    if preds.ndim != 4 or preds.shape != target.shape:
        raise ValueError(
            f"{name}: expected preds and target of the same shape (B, C, H, W), "
            f"got {tuple(preds.shape)} and {tuple(target.shape)}"
        )
    expected = (preds.shape[0], *preds.shape[2:])
    for mask in masks:
        if mask is not None and (mask.shape != expected or mask.dtype != torch.bool):
            raise ValueError(
                f"{name}: expected a bool mask of shape {expected}, got {mask.dtype} {tuple(mask.shape)}"
            )


def _reduce(per_sample: Tensor, reduction: Reduction) -> Tensor:
    """Mean over the samples that have a score (NaN marks a sample with nothing to score)."""
    if reduction == "none":
        return per_sample
    if reduction == "elementwise_mean":
        return per_sample[~per_sample.isnan()].mean()
    raise ValueError(f"reduction must be 'elementwise_mean' or 'none', got {reduction!r}")


def counted_pixels(preds: Tensor, mask: Tensor | None, owned: Tensor | None) -> Tensor:
    """``(B, H, W)`` True where a pixel enters the pixel metrics: valid and owned."""
    counted = torch.ones((preds.shape[0], *preds.shape[2:]), dtype=torch.bool, device=preds.device)
    if mask is not None:
        counted = counted & mask
    if owned is not None:
        counted = counted & owned
    return counted


def error_sums(
    preds: Tensor, target: Tensor, mask: Tensor | None = None, owned: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample: sum of absolute errors, sum of squared errors and the number of counted values (x channels)."""
    counted = counted_pixels(preds, mask, owned)
    difference = torch.where(
        counted[:, None], preds - target, torch.zeros((), dtype=preds.dtype, device=preds.device)
    )
    count = counted.flatten(1).sum(dim=1) * preds.shape[1]
    return difference.abs().sum(dim=(1, 2, 3)), difference.square().sum(dim=(1, 2, 3)), count


def fully_valid(mask: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """``(B,)`` True for images without an invalid pixel (the only ones GSSIM, LPIPS and FID score)."""
    if mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    return mask.flatten(1).all(dim=1)


def l1(preds: Tensor, target: Tensor, mask: Tensor | None = None, owned: Tensor | None = None) -> Tensor:
    """Mean absolute error over the counted (valid, owned) pixels and all channels."""
    _check_pair(preds, target, "l1", mask, owned)
    absolute, _, count = error_sums(preds, target, mask, owned)
    return absolute.sum() / count.sum()


def mse(preds: Tensor, target: Tensor, mask: Tensor | None = None, owned: Tensor | None = None) -> Tensor:
    """Mean squared error over the counted (valid, owned) pixels and all channels."""
    _check_pair(preds, target, "mse", mask, owned)
    _, squared, count = error_sums(preds, target, mask, owned)
    return squared.sum() / count.sum()


def psnr(
    preds: Tensor,
    target: Tensor,
    reduction: Reduction = "elementwise_mean",
    mask: Tensor | None = None,
    owned: Tensor | None = None,
) -> Tensor:
    """PSNR in dB (data range 1) from each image's counted-pixel MSE, then averaged over images (inf: perfect)."""
    _check_pair(preds, target, "psnr", mask, owned)
    _, squared, count = error_sums(preds, target, mask, owned)
    per_sample = 10.0 * torch.log10(count / squared)
    per_sample = torch.where(count > 0, per_sample, torch.full_like(per_sample, float("nan")))
    return _reduce(per_sample, reduction)


def window_fully_valid(mask: Tensor, kernel_size: int = SSIM_KERNEL_SIZE) -> Tensor:
    """``(B, H, W)`` True where the ``kernel_size`` window centred on the pixel lies on valid pixels only."""
    invalid = (~mask)[:, None].to(torch.float32)
    touched = F.max_pool2d(invalid, kernel_size, stride=1, padding=kernel_size // 2)
    return touched[:, 0] == 0


def ssim(
    preds: Tensor,
    target: Tensor,
    reduction: Reduction = "elementwise_mean",
    mask: Tensor | None = None,
    owned: Tensor | None = None,
) -> Tensor:
    """Differentiable SSIM with an 11x11 Gaussian window (sigma 1.5), data range 1, mean over channels.

    Without a mask identical to skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)``: the SSIM map is averaged over the pixels at least one window
    radius (5 px) from the border (torchmetrics' scalar also averages the reflect-padded border, so the full map
    is taken from torchmetrics and cropped here). With ``mask`` only centres whose whole 11x11 window is valid
    count, so the window statistics never see an invalid pixel; ``owned`` further restricts the centres.
    """
    _check_pair(preds, target, "ssim", mask, owned)
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
    centres = torch.zeros((preds.shape[0], *preds.shape[2:]), dtype=torch.bool, device=preds.device)
    centres[:, radius:-radius, radius:-radius] = True
    if mask is not None:
        centres = centres & window_fully_valid(mask)
    centres = counted_pixels(preds, centres, owned)
    weights = centres[:, None].to(ssim_map.dtype)
    count = centres.flatten(1).sum(dim=1) * preds.shape[1]
    per_sample = (ssim_map * weights).sum(dim=(1, 2, 3)) / count
    per_sample = torch.where(count > 0, per_sample, torch.full_like(per_sample, float("nan")))
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


def gssim(
    preds: Tensor, target: Tensor, reduction: Reduction = "elementwise_mean", mask: Tensor | None = None
) -> Tensor:
    """Gradient SSIM, the structure/edge score of the Sat-JEPA-Diff evaluation.

    For each scale s in {1, 1/2, 1/4}: convert both images to grey (mean of the channels, i.e. of RGB),
    downsample by s with area averaging, take the Sobel gradient magnitude, min-max normalise each magnitude map
    to [0, 1] per image, and compute ``ssim`` (11x11 Gaussian, sigma 1.5, data range 1) between the two maps.
    GSSIM is the mean of the three SSIMs. It rewards sharp, correctly placed edges, which blurry forecasts lose.
    Needs images of at least 44x44 pixels so the quarter scale still holds an SSIM window. An image with an
    invalid pixel in ``mask`` is NaN (left out): its hole would otherwise add a sharp rim to both edge maps.
    """
    _check_pair(preds, target, "gssim", mask)
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
    per_sample = torch.stack(per_scale).mean(dim=0)
    keep = fully_valid(mask, preds.shape[0], preds.device)
    per_sample = torch.where(keep, per_sample, torch.full_like(per_sample, float("nan")))
    return _reduce(per_sample, reduction)
