"""On-disk cache of the frozen extractor's output, one safetensors file per sample, in one of two tiers.

The extractor is frozen and deterministic, so what it computes for a sample never changes: compute it once, read
it in later epochs.

- ``pyramid`` stores the whole feature pyramid (~21 MB per sample at 256 px for SD 2.1 in float16): later epochs
  run no UNet at all, but read a lot from disk.
- ``latents`` stores the DDIM-inverted latents at the selected timesteps (~24 KB per sample at 256 px): later
  epochs skip the VAE and the inversion and run only the hooked UNet passes at the selected timesteps (one batched
  call).

Files live in ``root/<dataset key>/<extractor identity>-<tier>-<dtype>/<sample>.safetensors``: the dataset key names
every setting that changes the input pixels (task, bands, size, normalisation and its band_stats values), the
identity hashes the extractor config and weights, and tier and storage dtype are part of the folder too. Each file
also records identity, dataset key, sample and a hash of the input image, all checked on read: a changed image
under the same name is recomputed, never served stale. Entries that are not finite (float16 overflow) are refused
when written and ignored when read. Writes go to a temporary file renamed into place, so a crash or a concurrent
writer (several GPUs filling one cache) never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from fileio import atomic_path

CacheDtype = Literal["float32", "float16", "bfloat16"]
CacheTier = Literal["latents", "pyramid"]
Pyramid = list[list[torch.Tensor]]
Entry = dict[str, torch.Tensor]
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def _file_name(name: str) -> str:
    """A file-system-safe, collision-free name: unsafe characters replaced, plus a short hash if any were."""
    safe = _SAFE_NAME.sub("_", name)
    if safe != name or not safe or safe.startswith("."):
        safe = f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return safe


def input_hash(image: torch.Tensor) -> str:
    """A cheap fingerprint of one input image (its float32 bytes): a changed image never reads old features."""
    data = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class FeatureCache:
    """Read-through cache of per-sample extractor outputs for one dataset, one extractor and one tier.

    ``dtype`` is the storage precision (float16/bfloat16 halve the disk use); what is read comes back as float32,
    and freshly computed values are rounded through the storage precision too, so every epoch sees the same values.
    """

    def __init__(
        self,
        root: str | Path,
        dataset_key: str,
        extractor: nn.Module,
        dtype: CacheDtype = "float16",
        tier: CacheTier = "latents",
    ):
        if tier not in ("latents", "pyramid"):
            raise ValueError(f"cache tier must be 'latents' or 'pyramid', got {tier!r}")
        self.dataset_key = dataset_key
        self.extractor = extractor
        self.extractor_identity = extractor.cache_identity
        self.tier = tier
        self.dtype_name = dtype
        self.dtype: torch.dtype = getattr(torch, dtype)
        if tier == "pyramid":
            self.keys = [
                f"{level}.{index}"
                for level, channels in enumerate(extractor.feature_channels)
                for index in range(len(channels))
            ]
        else:
            self.keys = ["latents"]
        self.folder = Path(root) / _file_name(dataset_key) / f"{self.extractor_identity}-{tier}-{dtype}"
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, sample: str) -> Path:
        return self.folder / f"{_file_name(sample)}.safetensors"

    def _metadata(self, sample: str, fingerprint: str) -> dict[str, str]:
        return {
            "identity": self.extractor_identity,
            "dataset_key": self.dataset_key,
            "sample": sample,
            "input_hash": fingerprint,
            "tier": self.tier,
        }

    def _shape_ok(self, key: str, tensor: torch.Tensor) -> bool:
        if self.tier == "latents":
            return tensor.ndim == 4 and tensor.shape[:2] == (
                self.extractor.num_timesteps,
                self.extractor.latent_channels,
            )
        level, index = (int(part) for part in key.split("."))
        return tensor.ndim == 3 and tensor.shape[0] == self.extractor.feature_channels[level][index]

    def load(self, sample: str, fingerprint: str) -> Entry | None:
        """The stored entry of one sample (no batch dimension, storage dtype), or None when absent/unusable."""
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
        if metadata.get("input_hash") != fingerprint:
            warnings.warn(
                f"feature cache entry {path} was computed from another input image of sample '{sample}'; "
                "recomputing it",
                stacklevel=2,
            )
            return None
        valid = (
            metadata == self._metadata(sample, fingerprint)
            and sorted(tensors) == sorted(self.keys)
            and all(t.dtype == self.dtype and self._shape_ok(k, t) for k, t in tensors.items())
            and all(torch.isfinite(t).all() for t in tensors.values())
        )
        if not valid:
            warnings.warn(
                f"feature cache entry {path} does not match this extractor, dtype or tier, or is not finite; "
                "recomputing it",
                stacklevel=2,
            )
            return None
        return tensors

    def save(self, sample: str, fingerprint: str, entry: Entry) -> Entry:
        """Store one sample's entry atomically; returns it as stored (CPU, storage dtype)."""
        stored = {
            key: tensor.detach().to("cpu", self.dtype).contiguous().clone() for key, tensor in entry.items()
        }
        for key, tensor in stored.items():
            if not torch.isfinite(tensor).all():
                raise ValueError(
                    f"feature cache: sample '{sample}' ({self.tier} '{key}') is not finite in {self.dtype_name} "
                    "(overflow?); set model.init_args.cache_dtype to bfloat16 or float32"
                )
        path = self.path(sample)
        with atomic_path(path) as temporary:
            save_file(stored, temporary, metadata=self._metadata(sample, fingerprint))
        return stored

    def _compute(self, images: torch.Tensor) -> list[Entry]:
        """Fresh entries for a sub-batch."""
        if self.tier == "latents":
            return [{"latents": latents} for latents in self.extractor.noisy_latents(images)]
        pyramid = self.extractor(images)
        return [
            {
                f"{level}.{index}": maps[i]
                for level, level_maps in enumerate(pyramid)
                for index, maps in enumerate(level_maps)
            }
            for i in range(images.shape[0])
        ]

    def features(self, samples: list[str], images: torch.Tensor) -> Pyramid:
        """The batch pyramid (float32, on ``images.device``): cached samples are read, the others computed in one
        call on the missing sub-batch and stored; the latent tier then runs the hooked UNet pass on the batch."""
        if len(samples) != images.shape[0]:
            raise ValueError(
                f"feature cache got {len(samples)} sample names for a batch of {images.shape[0]} images"
            )
        fingerprints = [input_hash(image) for image in images]
        entries = [self.load(s, f) for s, f in zip(samples, fingerprints, strict=True)]
        missing = [i for i, entry in enumerate(entries) if entry is None]
        if missing:
            fresh = self._compute(images[missing])
            for i, entry in zip(missing, fresh, strict=True):
                entries[i] = self.save(samples[i], fingerprints[i], entry)
        stacked = {
            key: torch.stack([e[key] for e in entries]).to(images.device, torch.float32) for key in self.keys
        }
        if self.tier == "latents":
            return self.extractor.features_from_latents(stacked["latents"])
        return [
            [stacked[f"{level}.{index}"] for index in range(len(channels))]
            for level, channels in enumerate(self.extractor.feature_channels)
        ]
