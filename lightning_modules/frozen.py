"""Keep frozen pretrained weights out of checkpoints.

SD3.5, its VAE and text encoders, and the DiffusionSat UNet are rebuilt from the config's local paths on every
load, so writing their gigabytes into each checkpoint only costs disk and time. A module lists the attribute
names of its frozen parts in ``frozen_module_names``; their parameters and buffers that do not require grad are
dropped when saving and taken from the freshly built module when loading, so ``strict`` loading still catches
any missing trainable weight (LoRA layers injected into a frozen transformer do require grad and are kept).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule


class FrozenPartsCheckpointMixin:
    """Mixin for a LightningModule whose ``frozen_module_names`` parts are never checkpointed."""

    frozen_module_names: tuple[str, ...] = ()

    def frozen_state_keys(self: LightningModule) -> set[str]:
        """State-dict keys that belong to frozen pretrained parts and need no saving."""
        keys: set[str] = set()
        for name in self.frozen_module_names:
            module = getattr(self, name, None)
            if module is None:
                continue
            for param_name, param in module.named_parameters():
                if not param.requires_grad:
                    keys.add(f"{name}.{param_name}")
            for buffer_name, _ in module.named_buffers():
                keys.add(f"{name}.{buffer_name}")
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self.frozen_state_keys()
        state = checkpoint["state_dict"]
        for key in [k for k in state if k in frozen]:
            del state[key]
        checkpoint["frozen_parts_excluded"] = sorted(self.frozen_module_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        current = self.state_dict()
        state = checkpoint["state_dict"]
        for key in self.frozen_state_keys():
            if key not in state and key in current:
                state[key] = current[key]
