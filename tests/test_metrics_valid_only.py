"""Valid-only scoring on real Sentinel-2 pixels with holes, against numpy/skimage on the valid region alone."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import rasterio
import scipy.ndimage
import torch
from skimage.metrics import structural_similarity

from lightning_modules.baselines import BaselineForecastModule
from metrics import ForecastMetrics, functional
from metrics.forecast import FID
from networks.baselines.persistence import Persistence
from tests.test_metrics import ChannelStatistics, reference_gssim

SIZE = 64
HOLE = (slice(20, 40), slice(24, 44))  # 400 of 4096 pixels: a 10% cloud


@pytest.fixture(scope="module")
def austria(shared_data) -> tuple[np.ndarray, np.ndarray]:
    """The real pair: window A (bands 1-3) as the persistence forecast, window B (bands 5-7) as the target."""
    with rasterio.open(shared_data / "ftw-austria-s2" / "inference-img.tif") as src:
        pixels = src.read().astype(np.float64) / 10000.0
    return np.clip(pixels[0:3], 0, 1), np.clip(pixels[4:7], 0, 1)


def cloudy_batch(austria) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 64 px windows; the first target has a hole (stored as 0, as the DataModule does)."""
    before, after = austria
    offsets = ((100, 200), (200, 300))
    preds = np.stack([before[:, r : r + SIZE, c : c + SIZE] for r, c in offsets])
    target = np.stack([after[:, r : r + SIZE, c : c + SIZE] for r, c in offsets])
    mask = np.ones((2, SIZE, SIZE), dtype=bool)
    mask[0][HOLE] = False
    target[0][:, ~mask[0]] = 0.0
    return torch.from_numpy(preds).float(), torch.from_numpy(target).float(), torch.from_numpy(mask)


def valid_only_reference(preds: np.ndarray, target: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """L1, MSE, PSNR, SSIM of one (3, H, W) pair computed on its valid pixels only, with numpy and skimage."""
    difference = (preds - target)[:, valid]
    mse = float((difference**2).mean())
    _, ssim_map = structural_similarity(
        target,
        preds,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1,
        channel_axis=0,
        full=True,
    )
    centres = scipy.ndimage.binary_erosion(valid, structure=np.ones((11, 11)), border_value=1)
    interior = np.zeros_like(valid)
    interior[5:-5, 5:-5] = True
    return {
        "l1": float(np.abs(difference).mean()),
        "mse": mse,
        "psnr": 10 * np.log10(1 / mse),
        "ssim": float(ssim_map[:, centres & interior].mean()),
    }


def test_functional_metrics_score_valid_pixels_only(austria):
    preds, target, mask = cloudy_batch(austria)
    expected = valid_only_reference(preds[0].double().numpy(), target[0].double().numpy(), mask[0].numpy())
    one = (preds[:1], target[:1])
    assert functional.l1(*one, mask=mask[:1]).item() == pytest.approx(expected["l1"], rel=1e-5)
    assert functional.mse(*one, mask=mask[:1]).item() == pytest.approx(expected["mse"], rel=1e-5)
    assert functional.psnr(*one, mask=mask[:1]).item() == pytest.approx(expected["psnr"], rel=1e-5)
    assert functional.ssim(*one, mask=mask[:1]).item() == pytest.approx(expected["ssim"], abs=1e-5)
    scores = functional.gssim(preds, target, reduction="none", mask=mask)
    assert torch.isnan(scores[0])  # the holed window is left out of GSSIM
    assert scores[1].item() == pytest.approx(reference_gssim(preds[1].numpy(), target[1].numpy()), abs=1e-5)


def test_validation_metrics_do_not_reward_the_hole(austria):
    """Persistence through ForecastTask's validation path: no pixel of the hole enters any metric."""
    preds, target, mask = cloudy_batch(austria)
    module = BaselineForecastModule(network=Persistence())
    batch = {"image": preds[:, None], "target": target, "mask": mask}
    module.validation_step(batch, 0)
    values = module.val_metrics.compute()
    per_window = [
        valid_only_reference(p.double().numpy(), t.double().numpy(), m.numpy())
        for p, t, m in zip(preds, target, mask, strict=True)
    ]
    valid_counts = mask.flatten(1).sum(1).numpy() * 3
    for key in ("l1", "mse"):  # means over every valid pixel of the split
        pooled = sum(w[key] * n for w, n in zip(per_window, valid_counts, strict=True)) / valid_counts.sum()
        assert values[f"val/{key}"].item() == pytest.approx(pooled, rel=1e-5), key
    for key in ("psnr", "ssim"):  # means over images
        expected = np.mean([w[key] for w in per_window])
        assert values[f"val/{key}"].item() == pytest.approx(expected, abs=1e-4), key
    full_gssim = reference_gssim(preds[1].numpy(), target[1].numpy())
    assert values["val/gssim"].item() == pytest.approx(full_gssim, abs=1e-5)
    assert values["val/partial_windows"].item() == 1


def test_overlapping_windows_count_each_pixel_once(austria):
    """A 101 px tall image gives edge-aligned windows at rows 0 and 37; with ``owned`` the pair scores like
    the whole image, each pixel once."""
    before, after = austria
    image_preds, image_target = before[:, 50:151, 100:164], after[:, 50:151, 100:164]
    starts = (0, 37)
    preds = torch.from_numpy(np.stack([image_preds[:, s : s + SIZE] for s in starts]))
    target = torch.from_numpy(np.stack([image_target[:, s : s + SIZE] for s in starts]))
    owned = torch.ones(2, SIZE, SIZE, dtype=torch.bool)
    owned[0, starts[1] :] = False  # rows 37.. of the first window belong to the second
    difference = image_preds - image_target
    assert functional.l1(preds, target, owned=owned).item() == pytest.approx(np.abs(difference).mean())
    assert functional.mse(preds, target, owned=owned).item() == pytest.approx((difference**2).mean())
    assert functional.l1(preds, target).item() != pytest.approx(np.abs(difference).mean(), rel=1e-3)
    with pytest.warns(UserWarning):
        metrics = ForecastMetrics()
    metrics.update(preds, target, mask=torch.ones_like(owned), owned=owned)
    assert metrics.compute()["l1"].item() == pytest.approx(np.abs(difference).mean(), rel=1e-6)


def test_l1_and_mse_accept_any_strides(austria):
    preds, target, _ = cloudy_batch(austria)
    crop_preds, crop_target = preds[..., 3:50, 5:60], target[..., 3:50, 5:60]
    assert not crop_preds.is_contiguous()
    difference = (crop_preds - crop_target).double().numpy()
    assert functional.l1(crop_preds, crop_target).item() == pytest.approx(np.abs(difference).mean(), rel=1e-5)
    assert functional.mse(crop_preds, crop_target).item() == pytest.approx((difference**2).mean(), rel=1e-5)
    flipped = preds.transpose(-1, -2), target.transpose(-1, -2)
    assert functional.l1(*flipped).item() == pytest.approx(functional.l1(preds, target).item())


def test_fid_scores_fully_valid_windows_and_warns_when_rank_deficient(austria):
    preds, target, mask = cloudy_batch(austria)
    network = ChannelStatistics()  # 6-d features
    fid = FID(feature=network)
    fid.update(preds, target, mask=mask)
    assert int(fid.real_features_num_samples) == int(fid.fake_features_num_samples) == 1
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 16, 16, generator=generator)
    fid.update(images.flip(0), images)
    with pytest.warns(UserWarning, match="need more than 6 images"):
        fid.compute()
    fid.update(images, images.flip(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(fid.compute())  # 11 samples > 6 dimensions: no warning
