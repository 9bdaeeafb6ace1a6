"""On-disk cache of the frozen extractor's feature pyramids, one safetensors file per sample.

The extractor is frozen and deterministic, so its pyramid for a sample never changes: compute it once, read it in
later epochs. Files live in ``root/<dataset key>/<extractor identity>/<sample>.safetensors``; the identity hashes
the extractor config and its weights' identity, so a changed config or checkpoint gets a new folder and never reads
stale entries (each file also records the identity, dataset key and sample, checked on read). Writes go to a
temporary file renamed into place, so a crash or a concurrent writer never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CacheDtype = Literal["float32", "float16", "bfloat16"]
Pyramid = list[list[torch.Tensor]]
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def _file_name(name: str) -> str:
    """A file-system-safe, collision-free name: unsafe characters replaced, plus a short hash if any were."""
    safe = _SAFE_NAME.sub("_", name)
    if safe != name or not safe or safe.startswith("."):
        safe = f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return safe


class FeatureCache:
    """Read-through cache of per-sample pyramids for one dataset and one extractor.

    ``feature_channels`` (the extractor's nesting of channel counts) validates every entry read back.
    ``dtype`` is the storage precision (float16/bfloat16 halve the disk use); features come back as float32,
    and freshly computed ones are rounded through the storage precision too, so every epoch sees the same values.
    """

    def __init__(
        self,
        root: str | Path,
        dataset_key: str,
        extractor_identity: str,
        feature_channels: list[list[int]],
        dtype: CacheDtype = "float16",
    ):
        self.dataset_key = dataset_key
        self.extractor_identity = extractor_identity
        self.feature_channels = feature_channels
        self.dtype: torch.dtype = getattr(torch, dtype)
        self.folder = Path(root) / _file_name(dataset_key) / extractor_identity
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, sample: str) -> Path:
        return self.folder / f"{_file_name(sample)}.safetensors"

    def _metadata(self, sample: str) -> dict[str, str]:
        return {"identity": self.extractor_identity, "dataset_key": self.dataset_key, "sample": sample}

    def load(self, sample: str) -> Pyramid | None:
        """The stored pyramid of one sample (no batch dimension, storage dtype), or None when absent/unusable."""
        path = self.path(sample)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as reader:
                metadata = reader.metadata() or {}
                tensors = {key: reader.get_tensor(key) for key in reader.keys()}
        except (OSError, SafetensorError) as error:
            warnings.warn(f"unreadable feature cache entry {path} ({error}); recomputing it", stacklevel=2)
            return None
        pyramid = [
            [tensors.get(f"{level}.{index}") for index in range(len(channels))]
            for level, channels in enumerate(self.feature_channels)
        ]
        valid = (
            metadata == self._metadata(sample)
            and len(tensors) == sum(len(channels) for channels in self.feature_channels)
            and all(
                tensor is not None and tensor.ndim == 3 and tensor.shape[0] == channel
                for level, channels in zip(pyramid, self.feature_channels, strict=True)
                for tensor, channel in zip(level, channels, strict=True)
            )
        )
        if not valid:
            warnings.warn(
                f"feature cache entry {path} does not match this extractor; recomputing it", stacklevel=2
            )
            return None
        return pyramid

    def save(self, sample: str, pyramid: Pyramid) -> Pyramid:
        """Store one sample's pyramid atomically; returns it as stored (CPU, storage dtype)."""
        stored = [
            [tensor.detach().to("cpu", self.dtype).contiguous().clone() for tensor in level]
            for level in pyramid
        ]
        tensors = {
            f"{level}.{index}": tensor
            for level, maps in enumerate(stored)
            for index, tensor in enumerate(maps)
        }
        path = self.path(sample)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            save_file(tensors, temporary, metadata=self._metadata(sample))
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return stored

    def features(
        self, samples: list[str], images: torch.Tensor, extractor: Callable[[torch.Tensor], Pyramid]
    ) -> Pyramid:
        """The batch pyramid (float32, on ``images.device``): cached samples are read, the others extracted in
        one call on the missing sub-batch and stored."""
        if len(samples) != images.shape[0]:
            raise ValueError(
                f"feature cache got {len(samples)} sample names for a batch of {images.shape[0]} images"
            )
        per_sample = [self.load(sample) for sample in samples]
        missing = [i for i, pyramid in enumerate(per_sample) if pyramid is None]
        if missing:
            fresh = extractor(images[missing])
            for position, i in enumerate(missing):
                per_sample[i] = self.save(samples[i], [[maps[position] for maps in level] for level in fresh])
        return [
            [
                torch.stack([pyramid[level][index] for pyramid in per_sample]).to(
                    images.device, torch.float32
                )
                for index in range(len(channels))
            ]
            for level, channels in enumerate(self.feature_channels)
        ]
