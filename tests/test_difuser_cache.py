"""SatDiFuser feature cache: exact round trip, no stale reuse, atomic files, damaged entries recomputed."""

from __future__ import annotations

import pytest
import torch

from networks.difuser.cache import FeatureCache
from tests.test_difuser_extractor import images, tiny_extractor

DATASET_KEY = "geobench_m-eurosat_red+green+blue_native_minmax"


class CountingExtractor:
    """Wraps an extractor to count the images it was asked to process."""

    def __init__(self, extractor):
        self.extractor = extractor
        self.images_seen = 0

    def __call__(self, batch: torch.Tensor):
        self.images_seen += batch.shape[0]
        return self.extractor(batch)


def make_cache(root, extractor, dtype="float32") -> FeatureCache:
    return FeatureCache(root, DATASET_KEY, extractor.cache_identity, extractor.feature_channels, dtype)


def assert_same_pyramid(left, right, exact: bool = True):
    assert [len(level) for level in left] == [len(level) for level in right]
    for level_left, level_right in zip(left, right, strict=True):
        for a, b in zip(level_left, level_right, strict=True):
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
            assert torch.equal(a, b) if exact else torch.allclose(a, b)


@pytest.fixture(scope="module")
def extractor():
    return tiny_extractor(timesteps=[1, 100], num_inversion_steps=4)


def test_cache_returns_exactly_what_the_extractor_computes(tmp_path, extractor):
    batch, samples = images(batch=3), ["a", "b", "c"]
    expected = extractor(batch)
    counting = CountingExtractor(extractor)
    cache = make_cache(tmp_path, extractor)
    first = cache.features(samples, batch, counting)
    assert counting.images_seen == 3
    assert_same_pyramid(first, expected)
    # a fresh cache object (next epoch, another process) reads every sample without extracting
    again = make_cache(tmp_path, extractor).features(samples, batch, counting)
    assert counting.images_seen == 3
    assert_same_pyramid(again, expected)
    # a reordered batch with one new sample extracts only that sample
    mixed = make_cache(tmp_path, extractor).features(["c", "new", "a"], batch[[2, 0, 0]], counting)
    assert counting.images_seen == 4
    for level_mixed, level_expected in zip(mixed, expected, strict=True):
        for m, e in zip(level_mixed, level_expected, strict=True):
            assert torch.equal(m[0], e[2]) and torch.equal(m[2], e[0])
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary file


def test_half_precision_storage_is_the_rounded_extractor_output_every_time(tmp_path, extractor):
    batch, samples = images(batch=2), ["a", "b"]
    rounded = [[m.half().float() for m in level] for level in extractor(batch)]
    fresh = make_cache(tmp_path, extractor, "float16").features(samples, batch, extractor)
    stored = make_cache(tmp_path, extractor, "float16").features(samples, batch, extractor)
    assert_same_pyramid(fresh, rounded)
    assert_same_pyramid(stored, rounded)
    size_half = sum(p.stat().st_size for p in tmp_path.rglob("*.safetensors"))
    make_cache(tmp_path / "full", extractor, "float32").features(samples, batch, extractor)
    size_full = sum(p.stat().st_size for p in (tmp_path / "full").rglob("*.safetensors"))
    assert size_half < 0.6 * size_full


def test_changed_extractor_config_never_reuses_stale_entries(tmp_path, extractor):
    batch, samples = images(batch=2), ["a", "b"]
    make_cache(tmp_path, extractor).features(samples, batch, extractor)
    for changed in (
        tiny_extractor(timesteps=[1, 50], num_inversion_steps=4),  # other timesteps, same layout
        tiny_extractor(timesteps=[1, 100], num_inversion_steps=4, seed=1),  # other weights
    ):
        counting = CountingExtractor(changed)
        result = make_cache(tmp_path, changed).features(samples, batch, counting)
        assert counting.images_seen == 2
        assert_same_pyramid(result, changed(batch))
        assert not torch.equal(result[0][-1], extractor(batch)[0][-1])


def test_entries_of_another_dataset_or_damaged_files_are_not_used(tmp_path, extractor):
    batch, samples = images(batch=1), ["sample/with:odd chars"]
    cache = make_cache(tmp_path, extractor)
    cache.features(samples, batch, extractor)
    other = FeatureCache(
        tmp_path, "another-dataset", extractor.cache_identity, extractor.feature_channels, "float32"
    )
    counting = CountingExtractor(extractor)
    other.features(samples, batch, counting)
    assert counting.images_seen == 1
    path = cache.path(samples[0])
    assert path.parent == cache.folder and path.is_file()
    path.write_bytes(path.read_bytes()[:100])  # truncated entry
    with pytest.warns(UserWarning, match="unreadable feature cache entry"):
        result = cache.features(samples, batch, counting)
    assert counting.images_seen == 2
    assert_same_pyramid(result, extractor(batch))


def test_sample_names_must_match_the_batch(tmp_path, extractor):
    with pytest.raises(ValueError, match="2 sample names for a batch of 1"):
        make_cache(tmp_path, extractor).features(["a", "b"], images(batch=1), extractor)
