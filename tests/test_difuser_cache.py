"""SatDiFuser feature cache: both tiers round trip, no stale reuse (input, config, dtype), non-finite entries refused,
atomic files, damaged entries recomputed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from networks.difuser.cache import FeatureCache, input_hash
from tests.test_difuser_extractor import images, tiny_extractor

DATASET_KEY = "geobench_m-eurosat_red+green+blue_native_sensor-0123456789ab"


@pytest.fixture(scope="module")
def extractor():
    return tiny_extractor(timesteps=[1, 100], num_inversion_steps=4)


@pytest.fixture()
def encoded(extractor):
    """Batch sizes the VAE encoder sees (one per freshly computed sub-batch) during the test."""
    sizes: list[int] = []
    handle = extractor.vae.encoder.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    yield sizes
    handle.remove()


def make_cache(root, extractor, dtype="float32", tier="pyramid") -> FeatureCache:
    return FeatureCache(root, DATASET_KEY, extractor, dtype, tier)


def assert_same_pyramid(left, right):
    assert [len(level) for level in left] == [len(level) for level in right]
    for level_left, level_right in zip(left, right, strict=True):
        for a, b in zip(level_left, level_right, strict=True):
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
            assert torch.equal(a, b)


def test_pyramid_tier_returns_exactly_what_the_extractor_computes(tmp_path, extractor, encoded):
    batch, samples = images(batch=3), ["a", "b", "c"]
    expected = extractor(batch)
    encoded.clear()
    first = make_cache(tmp_path, extractor).features(samples, batch)
    assert encoded == [3]
    assert_same_pyramid(first, expected)
    # a fresh cache object (next epoch, another process) reads every sample without extracting
    again = make_cache(tmp_path, extractor).features(samples, batch)
    assert encoded == [3]
    assert_same_pyramid(again, expected)
    # a reordered batch with one new sample extracts only that sample
    mixed = make_cache(tmp_path, extractor).features(["c", "new", "a"], batch[[2, 0, 0]])
    assert encoded == [3, 1]
    for level_mixed, level_expected in zip(mixed, expected, strict=True):
        for m, e in zip(level_mixed, level_expected, strict=True):
            assert torch.equal(m[0], e[2]) and torch.equal(m[2], e[0])
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary file


def test_latent_tier_stores_latents_and_runs_only_the_hooked_pass(tmp_path, extractor, encoded):
    batch, samples = images(batch=2), ["a", "b"]
    expected = extractor(batch)
    encoded.clear()
    fresh = make_cache(tmp_path, extractor, "float16", "latents").features(samples, batch)
    unet_calls: list[int] = []
    handle = extractor.unet.register_forward_pre_hook(lambda m, args: unet_calls.append(args[0].shape[0]))
    stored = make_cache(tmp_path, extractor, "float16", "latents").features(samples, batch)
    handle.remove()
    assert encoded == [2]  # the second epoch neither encodes nor inverts ...
    assert unet_calls == [4]  # ... and runs one UNet call: 2 timesteps x 2 samples
    assert_same_pyramid(stored, fresh)  # every epoch sees the same (rounded) latents
    rounded = extractor.features_from_latents(extractor.noisy_latents(batch).half().float())
    assert_same_pyramid(stored, rounded)
    # float16 latents give nearly the uncached pyramid
    for level_stored, level_expected in zip(stored, expected, strict=True):
        for a, b in zip(level_stored, level_expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
    latent_bytes = sum(p.stat().st_size for p in tmp_path.rglob("*.safetensors"))
    make_cache(tmp_path / "pyramid", extractor, "float16", "pyramid").features(samples, batch)
    pyramid_bytes = sum(p.stat().st_size for p in (tmp_path / "pyramid").rglob("*.safetensors"))
    assert latent_bytes * 20 < pyramid_bytes


def test_half_precision_storage_is_the_rounded_extractor_output_every_time(tmp_path, extractor):
    batch, samples = images(batch=2), ["a", "b"]
    rounded = [[m.half().float() for m in level] for level in extractor(batch)]
    fresh = make_cache(tmp_path, extractor, "float16").features(samples, batch)
    stored = make_cache(tmp_path, extractor, "float16").features(samples, batch)
    assert_same_pyramid(fresh, rounded)
    assert_same_pyramid(stored, rounded)


def test_a_changed_image_under_the_same_name_is_recomputed(tmp_path, extractor, encoded):
    samples = ["a", "b"]
    make_cache(tmp_path, extractor).features(samples, images(batch=2, seed=0))
    changed = images(batch=2, seed=1)
    with pytest.warns(UserWarning, match="another input image of sample 'a'"):
        result = make_cache(tmp_path, extractor).features(samples, changed)
    assert encoded == [2, 2]
    assert_same_pyramid(result, extractor(changed))


def test_a_float32_cache_never_reads_float16_entries(tmp_path, extractor, encoded):
    batch, samples = images(batch=1), ["a"]
    half = make_cache(tmp_path, extractor, "float16")
    half.features(samples, batch)
    full = make_cache(tmp_path, extractor, "float32")
    assert full.folder != half.folder
    full.features(samples, batch)
    assert encoded == [1, 1]
    full.path("a").write_bytes(half.path("a").read_bytes())  # a float16 entry where float32 ones live
    with pytest.warns(UserWarning, match="does not match this extractor, dtype or tier"):
        result = full.features(samples, batch)
    assert encoded == [1, 1, 1]
    assert_same_pyramid(result, extractor(batch))


def test_float16_overflow_is_refused_and_non_finite_entries_are_not_read(tmp_path, extractor, encoded):
    cache = make_cache(tmp_path, extractor, "float16", "latents")
    batch = images(batch=1)
    fingerprint = input_hash(batch[0])
    latents = extractor.noisy_latents(batch)[0]
    with pytest.raises(ValueError, match="sample 'a'.*not finite in float16.*cache_dtype"):
        cache.save("a", fingerprint, {"latents": latents * 1e6})  # beyond float16's 65504
    assert not cache.path("a").exists()
    # an entry holding inf (as an unchecked writer stored overflow) is recomputed, not served
    save_file(
        {"latents": torch.full_like(latents, float("inf")).half()},
        cache.path("a"),
        cache._metadata("a", fingerprint),
    )
    encoded.clear()
    with pytest.warns(UserWarning, match="not finite"):
        result = cache.features(["a"], batch)
    assert encoded == [1]
    assert all(torch.isfinite(m).all() for level in result for m in level)


def test_changed_extractor_config_never_reuses_stale_entries(tmp_path, extractor, encoded):
    batch, samples = images(batch=2), ["a", "b"]
    make_cache(tmp_path, extractor).features(samples, batch)
    for changed in (
        tiny_extractor(timesteps=[1, 50], num_inversion_steps=4),  # other timesteps, same layout
        tiny_extractor(timesteps=[1, 100], num_inversion_steps=4, seed=1),  # other weights
    ):
        result = make_cache(tmp_path, changed).features(samples, batch)
        assert_same_pyramid(result, changed(batch))
        assert not torch.equal(result[0][-1], extractor(batch)[0][-1])


def test_entries_of_another_dataset_or_damaged_files_are_not_used(tmp_path, extractor, encoded):
    batch, samples = images(batch=1), ["sample/with:odd chars"]
    cache = make_cache(tmp_path, extractor)
    cache.features(samples, batch)
    other = FeatureCache(tmp_path, "another-dataset", extractor, "float32", "pyramid")
    other.features(samples, batch)
    assert encoded == [1, 1]
    path = cache.path(samples[0])
    assert path.parent == cache.folder and path.is_file()
    path.write_bytes(path.read_bytes()[:100])  # truncated entry
    with pytest.warns(UserWarning, match="unreadable feature cache entry"):
        result = cache.features(samples, batch)
    assert encoded == [1, 1, 1]
    assert_same_pyramid(result, extractor(batch))


def test_sample_names_must_match_the_batch(tmp_path, extractor):
    with pytest.raises(ValueError, match="2 sample names for a batch of 1"):
        make_cache(tmp_path, extractor).features(["a", "b"], images(batch=1))
