"""Keep frozen pretrained weights out of checkpoints, and refuse a checkpoint trained with other frozen weights.

SD3.5, its VAE and text encoders, and the DiffusionSat UNet are rebuilt from the config's local paths on every
load, so writing their gigabytes into each checkpoint only costs disk and time. A module lists the attribute
names of its frozen parts in ``frozen_module_names``; their parameters and buffers that do not require grad are
dropped when saving and taken from the freshly built module when loading, so ``strict`` loading still catches
any missing trainable weight (LoRA layers injected into a frozen transformer do require grad and are kept).

Because those parts come from the config and not from the checkpoint, a checkpoint loaded with another backbone of
the same shapes would load silently and score worse. Each checkpoint therefore stores a fingerprint of every
frozen part (its configuration and its frozen tensors) and loading refuses a mismatch, naming the part; set
``SATDIFF_ALLOW_FROZEN_MISMATCH=1`` to load anyway (with a warning).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

FINGERPRINT_KEY = "frozen_parts_fingerprint"
ALLOW_MISMATCH_VARIABLE = "SATDIFF_ALLOW_FROZEN_MISMATCH"
_SAMPLED_ELEMENTS = (
    1 << 16
)  # per tensor: exact bytes of an even sample, cheap even for SD3.5 and equal on any device


class FrozenPartMismatchError(ValueError):
    """The checkpoint was trained with other frozen pretrained weights or configuration."""


def _configuration(part: nn.Module) -> str:
    """The pretrained configurations inside ``part`` (diffusers/transformers ``config``), else its architecture."""
    configs = {}
    for name, module in part.named_modules():
        config = getattr(module, "config", None)
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        if isinstance(config, dict):  # drop paths and library versions, which do not change the weights
            configs[name] = {
                k: v for k, v in config.items() if not k.startswith("_") and not k.endswith("_version")
            }
    return json.dumps(configs, sort_keys=True, default=str) if configs else repr(part)


def _weights(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        flat = tensor.reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLED_ELEMENTS)].contiguous().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrozenPartsCheckpointMixin:
    """Mixin for a LightningModule whose ``frozen_module_names`` parts are never checkpointed."""

    frozen_module_names: tuple[str, ...] = ()

    def frozen_state_keys(self: LightningModule) -> set[str]:
        """State-dict keys that belong to frozen pretrained parts and need no saving."""
        return {f"{name}.{key}" for name in self.frozen_module_names for key in self._frozen_tensors(name)}

    def _frozen_tensors(self: LightningModule, name: str) -> dict[str, torch.Tensor]:
        module = getattr(self, name, None)
        if module is None:
            return {}
        tensors = {key: param for key, param in module.named_parameters() if not param.requires_grad}
        tensors.update(module.named_buffers())
        return tensors

    def frozen_fingerprints(self: LightningModule) -> dict[str, dict[str, str]]:
        """Per frozen part: hashes of its configuration and of its frozen tensors (computed once, they never change)."""
        cached = self.__dict__.get("_frozen_fingerprints")
        if cached is None:
            cached = {
                name: {
                    "config": hashlib.sha256(_configuration(getattr(self, name)).encode()).hexdigest(),
                    "weights": _weights(self._frozen_tensors(name)),
                }
                for name in self.frozen_module_names
                if getattr(self, name, None) is not None
            }
            self.__dict__["_frozen_fingerprints"] = cached
        return cached

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self.frozen_state_keys()
        state = checkpoint["state_dict"]
        for key in [k for k in state if k in frozen]:
            del state[key]
        checkpoint["frozen_parts_excluded"] = sorted(self.frozen_module_names)
        checkpoint[FINGERPRINT_KEY] = self.frozen_fingerprints()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_frozen_parts(checkpoint.get(FINGERPRINT_KEY, {}))
        current = self.state_dict()
        state = checkpoint["state_dict"]
        for key in self.frozen_state_keys():
            if key not in state and key in current:
                state[key] = current[key]

    def _check_frozen_parts(self, saved: dict[str, dict[str, str]]) -> None:
        current = self.frozen_fingerprints()
        for name in sorted(set(saved) & set(current)):
            differs = [
                aspect for aspect in ("config", "weights") if saved[name].get(aspect) != current[name][aspect]
            ]
            if not differs:
                continue
            message = (
                f"frozen part '{name}' differs from the one the checkpoint was trained with ({' and '.join(differs)}); "
                f"check the config's pretrained paths, or set {ALLOW_MISMATCH_VARIABLE}=1 to load anyway"
            )
            if os.environ.get(ALLOW_MISMATCH_VARIABLE) == "1":
                rank_zero_warn(message)
            else:
                raise FrozenPartMismatchError(message)
