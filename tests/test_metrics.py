"""Forecasting metrics against hand-made cases and independent implementations (numpy, scipy, skimage)."""

from __future__ import annotations

import socket
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
from skimage.metrics import structural_similarity
from skimage.transform import downscale_local_mean
from torch import nn
from torchmetrics.functional.image import lpips as lpips_module

from metrics import ForecastMetrics, functional, table
from metrics.forecast import (
    FID,
    GradientStructuralSimilarity,
    StructuralSimilarity,
    load_vgg16_backbone,
    to_uint8,
)
from tests.fixtures.make_metric_weights import write_random_inception, write_vgg16_features

BASE_KEYS = {"l1", "mse", "psnr", "ssim", "gssim"}
COLLECTION_KEYS = BASE_KEYS | {"partial_windows"}


def smooth_images(batch: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Image-like test data: smoothed noise with edges, in [0, 1], float64."""
    generator = np.random.default_rng(seed)
    noise = generator.random((batch, 3, size, size))
    smooth = scipy.ndimage.gaussian_filter(noise, sigma=(0, 0, 2, 2))
    smooth[..., size // 3 :, :] += 0.3  # a sharp horizontal edge
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return torch.from_numpy(smooth)


def perturbed(images: torch.Tensor, noise: float = 0.05, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (images + noise * torch.randn(images.shape, generator=generator, dtype=images.dtype)).clamp(0, 1)


def block_network(patch: pytest.MonkeyPatch, folder: Path) -> None:
    """Fail any connection attempt and hide any torch hub cache, so weights can only come from our files."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    patch.setattr(socket.socket, "connect", refuse)
    patch.setattr(socket, "create_connection", refuse)
    patch.setenv("TORCH_HOME", str(folder / "empty_torch_home"))


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    block_network(monkeypatch, tmp_path)


# ----- functional ---------------------------------------------------------------------------------------------
def test_l1_mse_psnr_match_numpy():
    target = smooth_images(3)
    preds = perturbed(target)
    diff = (preds - target).numpy()
    assert functional.l1(preds, target).item() == pytest.approx(np.abs(diff).mean())
    assert functional.mse(preds, target).item() == pytest.approx((diff**2).mean())
    per_image = [10 * np.log10(1.0 / (d**2).mean()) for d in diff]
    assert functional.psnr(preds, target).item() == pytest.approx(np.mean(per_image))
    assert functional.psnr(preds, target, reduction="none").numpy() == pytest.approx(per_image)


def test_psnr_hand_case():
    target = torch.zeros(1, 3, 16, 16)
    preds = torch.full_like(target, 0.1)  # MSE 0.01 -> 20 dB
    assert functional.psnr(preds, target).item() == pytest.approx(20.0, abs=1e-4)


def test_ssim_matches_skimage():
    target = smooth_images(3, size=40)
    preds = perturbed(target, noise=0.1)
    expected = [
        structural_similarity(
            t.numpy(),
            p.numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1,
            channel_axis=0,
        )
        for p, t in zip(preds, target, strict=True)
    ]
    assert functional.ssim(preds, target, reduction="none").numpy() == pytest.approx(expected, abs=1e-6)
    assert functional.ssim(preds, target).item() == pytest.approx(np.mean(expected), abs=1e-6)
    assert functional.ssim(target, target).item() == pytest.approx(1.0)


def test_ssim_is_differentiable():
    target = smooth_images(2, size=24).float()
    preds = perturbed(target).float().requires_grad_()
    loss = 1 - functional.ssim(preds, target)
    loss.backward()
    assert torch.isfinite(preds.grad).all()
    assert preds.grad.abs().sum() > 0


def test_ssim_and_gssim_reject_small_images():
    with pytest.raises(ValueError, match="ssim: images must be at least 11x11"):
        functional.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="gssim: images must be at least 44"):
        functional.gssim(torch.rand(1, 3, 40, 64), torch.rand(1, 3, 40, 64))
    with pytest.raises(ValueError, match="same shape"):
        functional.l1(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


def reference_gssim(preds: np.ndarray, target: np.ndarray) -> float:
    """The docstring's GSSIM written independently with scipy/skimage for one (3, H, W) pair."""
    scores = []
    for factor in (1, 2, 4):
        maps = []
        for image in (preds, target):
            grey = downscale_local_mean(image.mean(axis=0), (factor, factor))
            magnitude = np.hypot(
                scipy.ndimage.sobel(grey, axis=1, mode="nearest"),
                scipy.ndimage.sobel(grey, axis=0, mode="nearest"),
            )
            maps.append((magnitude - magnitude.min()) / (magnitude.max() - magnitude.min()))
        scores.append(
            structural_similarity(
                maps[0], maps[1], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1
            )
        )
    return float(np.mean(scores))


def test_gssim_matches_independent_implementation():
    target = smooth_images(2, size=48)
    preds = perturbed(target, noise=0.1)
    expected = [reference_gssim(p.numpy(), t.numpy()) for p, t in zip(preds, target, strict=True)]
    assert functional.gssim(preds, target, reduction="none").numpy() == pytest.approx(expected, abs=1e-6)


def test_gssim_hand_cases():
    target = smooth_images(2, size=48)
    assert functional.gssim(target, target).item() == pytest.approx(1.0)
    # Edges are unchanged by a brightness offset or a contrast change: min-max normalised Sobel maps agree.
    assert functional.gssim(0.5 * target + 0.2, target).item() == pytest.approx(1.0, abs=1e-6)
    constant = torch.full((1, 3, 48, 48), 0.4, dtype=torch.float64)
    assert functional.gssim(constant, constant).item() == pytest.approx(1.0)
    preds = perturbed(target, noise=0.1)
    assert functional.gssim(preds, target).item() == pytest.approx(functional.gssim(target, preds).item())


def test_gssim_decreases_with_blur():
    target = smooth_images(2, size=64)
    slightly = torch.from_numpy(scipy.ndimage.gaussian_filter(target.numpy(), sigma=(0, 0, 1, 1)))
    strongly = torch.from_numpy(scipy.ndimage.gaussian_filter(target.numpy(), sigma=(0, 0, 3, 3)))
    assert 1.0 > functional.gssim(slightly, target).item() > functional.gssim(strongly, target).item()


# ----- metric classes and the collection ----------------------------------------------------------------------
def test_collection_matches_functional_over_batches():
    target = smooth_images(5, size=48).float()
    preds = perturbed(target).float()
    with pytest.warns(UserWarning):
        metrics = ForecastMetrics()
    metrics.update(preds[:2], target[:2])
    metrics.update(preds[2:], target[2:])
    values = metrics.compute()
    assert set(values) == COLLECTION_KEYS and values["partial_windows"] == 0
    for key in BASE_KEYS:
        expected = getattr(functional, key)(preds, target)
        assert values[key].item() == pytest.approx(expected.item(), rel=1e-5), key


def test_unset_weights_warn_once_naming_the_keys():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = ForecastMetrics()
        metrics.clone(prefix="val/")
    messages = [str(w.message) for w in caught if "ForecastMetrics" in str(w.message)]
    assert len(messages) == 1
    assert "lpips_weights" in messages[0] and "fid_weights" in messages[0]


def test_missing_weight_paths_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="lpips_weights"):
        ForecastMetrics(lpips_weights=tmp_path / "no_vgg.pth")
    with pytest.raises(FileNotFoundError, match="fid_weights"):
        ForecastMetrics(fid_weights=tmp_path / "no_inception.pth")
    with pytest.raises(ValueError, match="fid_feature"):
        FID(feature=100, weights=tmp_path / "no_inception.pth")


def test_clone_prefix_and_states_merge_like_ddp():
    """Sum/count states: merging two ranks' states (the DDP reduction) equals one pass over all samples."""
    target = smooth_images(4, size=48).float()
    preds = perturbed(target).float()
    for metric_class in (StructuralSimilarity, GradientStructuralSimilarity):
        rank0, rank1, single = metric_class(), metric_class(), metric_class()
        rank0.update(preds[:1], target[:1])
        rank1.update(preds[1:], target[1:])
        single.update(preds, target)
        rank0.merge_state(rank1)
        assert rank0.compute().item() == pytest.approx(single.compute().item(), rel=1e-6)
    with pytest.warns(UserWarning):
        val = ForecastMetrics().clone(prefix="val/")
    assert set(val(preds, target)) == {f"val/{key}" for key in COLLECTION_KEYS}


# ----- FID --------------------------------------------------------------------------------------------------
class ChannelStatistics(nn.Module):
    """A tiny FID feature network: per-channel mean and std of the uint8 image; records what it was given."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images)
        values = images.double() / 255.0
        return torch.cat([values.mean(dim=(2, 3)), values.std(dim=(2, 3))], dim=1)


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    mu_real, mu_fake = real.mean(axis=0), fake.mean(axis=0)
    cov_real, cov_fake = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = scipy.linalg.sqrtm(cov_real @ cov_fake).real
    return float(((mu_real - mu_fake) ** 2).sum() + np.trace(cov_real + cov_fake - 2 * root))


def numpy_features(images: torch.Tensor) -> np.ndarray:
    values = np.clip(np.round(images.numpy() * 255.0), 0, 255) / 255.0
    return np.concatenate([values.mean(axis=(2, 3)), values.std(axis=(2, 3), ddof=1)], axis=1)


def test_fid_arithmetic_with_injected_network():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(12, 3, 48, 48, generator=generator)
    preds = (0.7 * torch.rand(12, 3, 48, 48, generator=generator) + 0.2).clamp(0, 1)
    with pytest.warns(UserWarning, match="lpips_weights"):
        metrics = ForecastMetrics(fid_feature=ChannelStatistics())
    metrics.update(preds[:5], target[:5])
    metrics.update(preds[5:], target[5:])
    expected = frechet_distance(numpy_features(target), numpy_features(preds))
    assert metrics["fid"].compute().item() == pytest.approx(expected, rel=1e-4)


def test_fid_uint8_conversion_saturates_instead_of_wrapping():
    images = torch.tensor([-0.2, 0.0, 0.5, 1.0, 1.2]).view(1, 1, 1, 5)
    assert to_uint8(images).flatten().tolist() == [0, 0, 128, 255, 255]
    network = ChannelStatistics()
    fid = FID(feature=network)
    fid.update(torch.full((2, 3, 4, 4), 1.3), torch.full((2, 3, 4, 4), -0.1))
    real, fake = network.seen[-2:]
    assert real.dtype == torch.uint8 and (real == 0).all() and (fake == 255).all()


def test_fid_with_one_sample_warns_and_returns_nan():
    fid = FID(feature=ChannelStatistics())
    fid.update(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))
    with pytest.warns(UserWarning, match="at least 2 images"):
        value = fid.compute()
    assert torch.isnan(value)


def test_fid_from_local_inception_file_offline_shared_and_not_checkpointed(tmp_path, no_network):
    weights = write_random_inception(tmp_path / "pt_inception-2015-12-05.pth")
    with pytest.warns(UserWarning, match="lpips_weights"):
        metrics = ForecastMetrics(fid_weights=weights, fid_feature=64)
    fid = metrics["fid"]
    assert fid.inception.features_list == ["64"]
    reference = torch.load(weights, weights_only=False)
    assert torch.equal(fid.inception.Conv2d_1a_3x3.conv.weight, reference["Conv2d_1a_3x3.conv.weight"])
    images = smooth_images(4, size=48).float()
    metrics.update(perturbed(images).float(), images)
    assert torch.isfinite(metrics.compute()["fid"])

    val = metrics.clone(prefix="val/")
    assert val["fid"].inception is fid.inception
    state = val.state_dict()
    assert not any(".inception." in key for key in state)
    val.load_state_dict(state, strict=True)


# ----- LPIPS ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lpips_metrics(tmp_path_factory):
    """ForecastMetrics with LPIPS from a local VGG16 file, built once (VGG16 is slow to build) with no network."""
    folder = tmp_path_factory.mktemp("lpips")
    vgg_file = write_vgg16_features(folder / "vgg16.pth")
    with pytest.MonkeyPatch.context() as patch:
        block_network(patch, folder)
        with pytest.warns(UserWarning, match="fid_weights"):
            metrics = ForecastMetrics(lpips_weights=vgg_file)
    return metrics, vgg_file


def test_lpips_from_local_vgg_file(lpips_metrics):
    metrics, vgg_file = lpips_metrics
    assert set(metrics.keys()) == COLLECTION_KEYS | {"lpips"}
    lpips = metrics["lpips"].clone()
    source = torch.load(vgg_file, weights_only=True)
    assert torch.equal(lpips.net.net.slice1[0].weight, source["features.0.weight"])
    assert torch.equal(getattr(lpips.net.net.slice5, "28").weight, source["features.28.weight"])
    packaged = torch.load(
        Path(lpips_module.__file__).parent / "lpips_models" / "vgg.pth", map_location="cpu", weights_only=True
    )
    assert torch.equal(lpips.net.lin0.model[1].weight, packaged["lin0.model.1.weight"])

    images = smooth_images(2, size=32).float()
    lpips.update(images, images)
    assert lpips.compute().item() == pytest.approx(0.0, abs=1e-7)
    lpips.reset()
    lpips.update(perturbed(images, noise=0.2).float() + 0.1, images)  # out-of-range values are clamped
    assert lpips.compute().item() > 0


def test_lpips_scores_fully_valid_windows_only(lpips_metrics):
    metrics, _ = lpips_metrics
    target = smooth_images(2, size=32).float()
    preds = perturbed(target, noise=0.2).float()
    mask = torch.ones(2, 32, 32, dtype=torch.bool)
    mask[0, 4:10, 4:10] = False
    holed, alone = metrics["lpips"].clone(), metrics["lpips"].clone()
    holed.update(preds, target, mask=mask)
    alone.update(preds[1:], target[1:])
    assert int(holed.left_out) == 1 and int(holed.num_samples) == 1
    assert holed.compute().item() == pytest.approx(alone.compute().item())


def test_lpips_is_shared_by_clones_and_not_checkpointed(lpips_metrics):
    metrics, _ = lpips_metrics
    test = metrics.clone(prefix="test/")
    assert test["lpips"].net is metrics["lpips"].net
    assert any(key.startswith("net.") for key in nn.Module.state_dict(test["lpips"]))  # what is left out
    test.persistent(True)
    images = smooth_images(2, size=48).float()
    test.update(perturbed(images).float(), images)
    state = test.state_dict()
    assert "lpips.score_sum" in state and not any(".net." in key for key in state)
    restored = metrics.clone()
    restored.load_state_dict(state, strict=True)
    assert restored["lpips"].score_sum == test["lpips"].score_sum > 0


def test_vgg16_file_must_fit_the_backbone(tmp_path):
    backbone = nn.Sequential(OrderedDict(slice1=nn.Sequential(nn.Conv2d(3, 4, 3))))
    partial = tmp_path / "partial.pth"
    torch.save({"features.0.weight": torch.zeros(4, 3, 3, 3)}, partial)
    with pytest.raises(
        ValueError, match="lpips_weights: .*partial.pth is not a torchvision vgg16 state dict"
    ):
        load_vgg16_backbone(backbone, partial)
    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3), "features.0.bias": torch.zeros(8)}, wrong_shape)
    with pytest.raises(ValueError, match="lpips_weights: .*wrong_shape.pth does not fit VGG16"):
        load_vgg16_backbone(backbone, wrong_shape)


# ----- table ------------------------------------------------------------------------------------------------
def test_table_rows_round_trip_and_format(tmp_path):
    results = tmp_path / "results.csv"
    table.append_row(
        results,
        "persistence",
        {"l1": 0.0131, "mse": 0.0008, "psnr": 37.5213, "ssim": 0.9361, "gssim": 0.7858},
    )
    table.append_row(
        results,
        "SimVP",
        table.metric_row({"test/l1": torch.tensor(0.0131), "test/fid": 18.72, "test/loss": 1.0}),
    )
    table.append_row(results, "persistence", {"l1": 0.0130})
    rows = table.read_rows(results)
    assert list(rows) == ["persistence", "SimVP"]
    assert rows["persistence"] == {"l1": 0.0130}
    assert rows["SimVP"] == pytest.approx({"l1": 0.0131, "fid": 18.72})

    text = table.format_table({"persistence": {"l1": 0.0131, "psnr": 37.5213}, "SimVP v2": {"fid": 18.72}})
    lines = text.splitlines()
    assert [cell.strip() for cell in lines[0].split("|")[1:-1]] == ["Model", *table.COLUMNS.values()]
    assert "| persistence | 0.0131 |   - | 37.52 |" in lines[2]
    assert lines[3].startswith("| SimVP v2") and lines[3].endswith("| 18.7200 |")
    assert len({len(line) for line in lines}) == 1


def test_table_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown metric keys"):
        table.append_row(tmp_path / "r.csv", "m", {"accuracy": 1.0})
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("name,score\nm,1\n")
    with pytest.raises(ValueError, match="wrong.csv"):
        table.read_rows(wrong)
    broken = tmp_path / "broken.csv"
    table.append_row(broken, "m", {"l1": 0.1})
    broken.write_text(broken.read_text() + "n,abc,,,,,,\n")
    with pytest.raises(ValueError, match="broken.csv:3: column 'l1'"):
        table.read_rows(broken)
