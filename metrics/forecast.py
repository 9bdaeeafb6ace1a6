"""The forecasting metric collection: L1, MSE, PSNR, SSIM, GSSIM and, from local weights, LPIPS (VGG) and FID.

``update(preds, target, mask=None, owned=None)`` scores valid pixels only (see ``metrics.functional``): the pixel
metrics count valid pixels that the window owns, SSIM only centres of fully valid 11x11 windows, and GSSIM,
LPIPS and FID only fully valid images; ``partial_windows`` counts the images those three left out. Every metric keeps torchmetrics states that are summed over DDP ranks before ``compute``; nothing is accumulated
on the Python side. LPIPS and FID read their pretrained networks from local files and never download: the
frozen networks are shared between ``clone()``s (one copy for the train/val/test collections) and are left out of
``state_dict`` (checkpoints), because they are rebuilt from the config paths.
"""

from __future__ import annotations

from abc import abstractmethod
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.functional.image.lpips import _NoTrainLpips
from torchmetrics.image import FrechetInceptionDistance
from torchmetrics.utilities import rank_zero_warn

from metrics import functional

LPIPS_WEIGHTS_KEY = "lpips_weights"
FID_WEIGHTS_KEY = "fid_weights"
FID_FEATURE_KEY = "fid_feature"
FID_FEATURE_SIZES = (64, 192, 768, 2048)


def _existing_file(path: str | Path, key: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: weights file not found: {path}")
    return path


def to_uint8(images: Tensor) -> Tensor:
    """[0, 1] floats to uint8 [0, 255]; clamped first, so out-of-range values saturate instead of wrapping."""
    return (images.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


class PixelError(Metric):
    """Mean absolute (``power=1``) or squared (``power=2``) error over every counted pixel of every image."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, power: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if power not in (1, 2):
            raise ValueError(f"power must be 1 (L1) or 2 (MSE), got {power!r}")
        self.power = power
        self.add_state("error_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_values", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, preds: Tensor, target: Tensor, mask: Tensor | None = None, owned: Tensor | None = None
    ) -> None:
        functional._check_pair(preds, target, type(self).__name__, mask, owned)
        absolute, squared, count = functional.error_sums(preds.detach(), target, mask, owned)
        self.error_sum += (absolute if self.power == 1 else squared).double().sum()
        self.num_values += count.sum()

    def compute(self) -> Tensor:
        return (self.error_sum / self.num_values).float()


class MeanOverSamples(Metric):
    """Mean of a per-sample score over the samples that have one; a float64 sum and counts, summed over ranks.

    A NaN score (nothing valid to score) is left out and counted in ``left_out``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("left_out", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @abstractmethod
    def score(self, preds: Tensor, target: Tensor, mask: Tensor | None, owned: Tensor | None) -> Tensor:
        """One score per sample, shape ``(B,)``; NaN where the sample has nothing to score."""

    def update(
        self, preds: Tensor, target: Tensor, mask: Tensor | None = None, owned: Tensor | None = None
    ) -> None:
        with torch.no_grad():
            scores = self.score(preds, target, mask, owned)
        scored = ~scores.isnan()
        self.score_sum += scores[scored].double().sum()
        self.num_samples += scored.sum()
        self.left_out += (~scored).sum()

    def compute(self) -> Tensor:
        return (self.score_sum / self.num_samples).float()


class PeakSignalToNoise(MeanOverSamples):
    """Mean over images of the PSNR of each image's counted pixels, as ``metrics.functional.psnr``."""

    def score(self, preds: Tensor, target: Tensor, mask: Tensor | None, owned: Tensor | None) -> Tensor:
        return functional.psnr(preds, target, reduction="none", mask=mask, owned=owned)


class StructuralSimilarity(MeanOverSamples):
    """Mean SSIM over images, as ``metrics.functional.ssim`` (skimage-compatible, fully valid windows only)."""

    def score(self, preds: Tensor, target: Tensor, mask: Tensor | None, owned: Tensor | None) -> Tensor:
        return functional.ssim(preds, target, reduction="none", mask=mask, owned=owned)


class GradientStructuralSimilarity(MeanOverSamples):
    """Mean GSSIM over fully valid images, as ``metrics.functional.gssim`` (multi-scale SSIM of Sobel edges)."""

    def score(self, preds: Tensor, target: Tensor, mask: Tensor | None, owned: Tensor | None) -> Tensor:
        return functional.gssim(preds, target, reduction="none", mask=mask)


class PartialWindows(Metric):
    """Number of images with an invalid pixel: those GSSIM, LPIPS and FID leave out (reported, not hidden)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        self.count += (~functional.fully_valid(mask, preds.shape[0], preds.device)).sum()

    def compute(self) -> Tensor:
        return self.count.float()


class _FrozenNetworkMixin:
    """For a Metric holding a frozen pretrained network in attribute ``frozen_network``: clones share it and
    checkpoints leave it out (loading takes it from the freshly built metric)."""

    frozen_network: str

    def __deepcopy__(self, memo: dict) -> Metric:
        network = getattr(self, self.frozen_network)
        memo[id(network)] = network
        copy = type(self).__new__(type(self))
        memo[id(self)] = copy
        copy.__setstate__(deepcopy(self.__getstate__(), memo))
        return copy

    def state_dict(self, *args: Any, destination=None, prefix: str = "", keep_vars: bool = False) -> dict:
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        frozen_prefix = f"{prefix}{self.frozen_network}."
        for key in [key for key in state if key.startswith(frozen_prefix)]:
            del state[key]
        return state

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        network = getattr(self, self.frozen_network)
        for name, value in network.state_dict().items():
            state_dict.setdefault(f"{prefix}{self.frozen_network}.{name}", value)
        super()._load_from_state_dict(state_dict, prefix, *args)


def load_vgg16_backbone(backbone: nn.Module, weights: str | Path) -> None:
    """Copy ``features.*`` of a torchvision vgg16 state-dict file into torchmetrics' sliced LPIPS VGG16.

    The slices keep torchvision's layer indices (``slice2.5.weight`` is ``features.5.weight``), so the mapping
    is by index. A file without every convolution of ``features`` is rejected with the config key named.
    """
    path = _existing_file(weights, LPIPS_WEIGHTS_KEY)
    source = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(source, dict):
        raise ValueError(f"{LPIPS_WEIGHTS_KEY}: {path} is not a state dict (got {type(source).__name__})")
    mapped = {}
    for name in backbone.state_dict():
        layer_and_param = name.split(".", 1)[1]
        key = f"features.{layer_and_param}"
        if key not in source:
            raise ValueError(
                f"{LPIPS_WEIGHTS_KEY}: {path} is not a torchvision vgg16 state dict (no {key!r})"
            )
        mapped[name] = source[key]
    try:
        backbone.load_state_dict(mapped)
    except RuntimeError as error:
        raise ValueError(f"{LPIPS_WEIGHTS_KEY}: {path} does not fit VGG16: {error}") from error


class LPIPS(_FrozenNetworkMixin, MeanOverSamples):
    """LPIPS with a VGG16 backbone, mean over images (lower is better).

    Uses torchmetrics' LPIPS network and the linear-layer weights that torchmetrics ships (``lpips_models/vgg.pth``);
    the ImageNet VGG16 backbone, which torchmetrics would download, is read from ``vgg_weights`` (a torchvision
    vgg16 state-dict file) instead. Inputs are clamped to [0, 1]; images with an invalid pixel are left out.
    """

    frozen_network = "net"
    higher_is_better = False

    def __init__(self, vgg_weights: str | Path, **kwargs: Any) -> None:
        path = _existing_file(vgg_weights, LPIPS_WEIGHTS_KEY)
        super().__init__(**kwargs)
        # pnet_rand: build VGG16 without ImageNet weights (torchmetrics would download them); they come from `path`.
        self.net = _NoTrainLpips(net="vgg", pretrained=True, pnet_rand=True)
        load_vgg16_backbone(self.net.net, path)

    def score(self, preds: Tensor, target: Tensor, mask: Tensor | None, owned: Tensor | None) -> Tensor:
        keep = functional.fully_valid(mask, preds.shape[0], preds.device)
        scores = torch.full((preds.shape[0],), float("nan"), device=preds.device)
        if keep.any():
            scores[keep] = (
                self.net(preds[keep].clamp(0.0, 1.0), target[keep].clamp(0.0, 1.0), normalize=True)
                .flatten()
                .float()
            )
        return scores


class FID(_FrozenNetworkMixin, FrechetInceptionDistance):
    """FID between forecasts and targets; ``update(preds, target)`` adds targets as real, forecasts as fake.

    ``feature`` is the Inception layer width (2048 standard; 64 is what the paper's table used) with weights read
    from ``weights`` (torch-fidelity's ``weights-inception-2015-12-05`` file), or an ``nn.Module`` taking uint8
    ``(B, 3, H, W)`` images and returning ``(B, D)`` features. Images are converted to uint8 with clamping (no
    wrap-around). Only fully valid images (no invalid pixel in ``mask``) enter. With fewer than two samples per
    side FID is undefined: ``compute`` warns and returns NaN; with no more samples than feature dimensions the
    covariances are rank-deficient (the paper's 64-d FID needs more than 64 images): ``compute`` warns.
    """

    frozen_network = "inception"

    def __init__(
        self, feature: int | nn.Module = 2048, weights: str | Path | None = None, **kwargs: Any
    ) -> None:
        if isinstance(feature, nn.Module):
            if weights is not None:
                raise ValueError(f"{FID_WEIGHTS_KEY} must be unset when {FID_FEATURE_KEY} is a network")
            super().__init__(feature=feature, normalize=False, **kwargs)
            return
        if feature not in FID_FEATURE_SIZES:
            raise ValueError(f"{FID_FEATURE_KEY} must be one of {FID_FEATURE_SIZES}, got {feature!r}")
        if weights is None:
            raise ValueError(f"{FID_WEIGHTS_KEY} is required to build the Inception network")
        path = _existing_file(weights, FID_WEIGHTS_KEY)
        super().__init__(feature=feature, normalize=False, feature_extractor_weights_path=str(path), **kwargs)

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        keep = functional.fully_valid(mask, preds.shape[0], preds.device)
        if not keep.any():
            return
        super().update(to_uint8(target[keep]), real=True)
        super().update(to_uint8(preds[keep]), real=False)

    def compute(self) -> Tensor:
        samples = int(min(self.real_features_num_samples, self.fake_features_num_samples))
        if samples < 2:
            rank_zero_warn(f"FID needs at least 2 images per side, got {samples}: returning NaN")
            return torch.tensor(float("nan"), device=self.real_features_sum.device)
        dimensions = self.real_features_sum.numel()
        if samples <= dimensions:
            rank_zero_warn(
                f"FID from {samples} images per side with {dimensions}-d features: the covariances need more "
                f"than {dimensions} images to be full rank, so this FID is unreliable"
            )
        return super().compute()


class ForecastMetrics(MetricCollection):
    """``l1, mse, psnr, ssim, gssim, partial_windows[, lpips, fid]`` on ``(B, 3, H, W)`` images in [0, 1].

    ``update(preds, target, mask=None, owned=None)``: ``mask`` marks valid pixels, ``owned`` the pixels this
    window is scored on (overlapping windows own each pixel once); see the module docstring.

    LPIPS needs ``lpips_weights`` (torchvision vgg16 state dict), FID needs ``fid_weights`` (torch-fidelity
    Inception) or an injected ``fid_feature`` network; unset keys skip those metrics with one warning, a path that
    does not exist raises naming the key. ``clone(prefix="val/")`` is cheap: the frozen networks are shared.
    """

    def __init__(
        self,
        lpips_weights: str | Path | None = None,
        fid_weights: str | Path | None = None,
        fid_feature: int | nn.Module = 2048,
        prefix: str | None = None,
    ) -> None:
        metrics: dict[str, Metric] = {
            "l1": PixelError(power=1),
            "mse": PixelError(power=2),
            "psnr": PeakSignalToNoise(),
            "ssim": StructuralSimilarity(),
            "gssim": GradientStructuralSimilarity(),
            "partial_windows": PartialWindows(),
        }
        skipped = []
        if lpips_weights is None:
            skipped.append(f"lpips ({LPIPS_WEIGHTS_KEY} is not set)")
        else:
            metrics["lpips"] = LPIPS(lpips_weights)
        if isinstance(fid_feature, nn.Module) or fid_weights is not None:
            metrics["fid"] = FID(fid_feature, fid_weights)
        else:
            skipped.append(f"fid ({FID_WEIGHTS_KEY} is not set)")
        if skipped:
            rank_zero_warn(f"ForecastMetrics: skipping {' and '.join(skipped)}; the other metrics still run.")
        # Compute groups would merge metrics whose states happen to be equal (they share state names).
        super().__init__(metrics, prefix=prefix, compute_groups=False)
