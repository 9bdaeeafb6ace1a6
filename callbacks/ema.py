"""Exponential moving average of the trainable weights only.

Lightning's ``EMAWeightAveraging`` deep-copies the whole LightningModule into an ``AveragedModel``, so a frozen
SD3.5 transformer or VAE would be duplicated in memory and written twice into every checkpoint. Here the averaged
copy holds only the parameters that require grad (LoRA, adapter, I-JEPA parts, fusion, heads, baselines); frozen
parts and buffers are used as they are. Not to be confused with the I-JEPA target encoder, an EMA inside the model.

Checkpoint layout: ``state_dict`` holds the EMA weights (so ``test``/``predict --ckpt_path`` and
``load_from_checkpoint`` evaluate the averaged model), ``checkpoint["ema"]`` holds the raw trainable weights and the
averaging counter needed to resume training exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.optim.swa_utils import AveragedModel

CHECKPOINT_KEY = "ema"


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named parameters that the optimiser updates, in a stable order."""
    return [(name, param) for name, param in module.named_parameters() if param.requires_grad]


class _ParameterGroup(nn.Module):
    """Holds given parameters (no copy), so ``AveragedModel`` can average a subset of a module."""

    def __init__(self, parameters: list[nn.Parameter]):
        super().__init__()
        self.values = nn.ParameterList(parameters)


class TrainableAveragedModel(AveragedModel):
    """``AveragedModel`` over the trainable parameters of a module; ``update_parameters`` takes the whole module."""

    def __init__(self, module: nn.Module, device: torch.device | None, **kwargs: Any):
        named = trainable_parameters(module)
        if not named:
            raise ValueError(f"{type(module).__name__} has no trainable parameters to average")
        super().__init__(
            _ParameterGroup([param for _, param in named]), device=device, use_buffers=False, **kwargs
        )
        self.names = [name for name, _ in named]

    def averaged(self) -> list[torch.Tensor]:
        return list(self.module.values)

    def live(self, module: nn.Module) -> list[nn.Parameter]:
        """The module's trainable parameters, in the order of ``names`` (fails if the trainable set changed)."""
        named = trainable_parameters(module)
        names = [name for name, _ in named]
        if names != self.names:
            missing = sorted(set(self.names) - set(names))
            extra = sorted(set(names) - set(self.names))
            raise RuntimeError(
                f"EMA: the trainable parameters changed since the average was created (missing {missing[:5]}, "
                f"new {extra[:5]}); EMA needs a fixed set of trainable parameters"
            )
        return [param for _, param in named]

    def update_parameters(self, model: nn.Module) -> None:  # type: ignore[override]
        super().update_parameters(_ParameterGroup(self.live(model)))


class TrainableEMA(EMAWeightAveraging):
    """EMA of the trainable weights, swapped in for validation and written as the checkpoint's ``state_dict``.

    Args:
        decay: EMA decay per update (``ema = decay * ema + (1 - decay) * weights``).
        start_step: optimizer steps before averaging starts; until then the average follows the weights.
        update_every_n_steps: average every n optimizer steps.
        device: where the average lives (e.g. ``"cpu"`` to spare GPU memory); default: the module's device.
    """

    def __init__(
        self,
        decay: float = 0.999,
        start_step: int = 0,
        update_every_n_steps: int = 1,
        device: str | None = None,
    ):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"TrainableEMA: decay must be in [0, 1], got {decay}")
        if start_step < 0 or update_every_n_steps < 1:
            raise ValueError("TrainableEMA: start_step must be >= 0 and update_every_n_steps >= 1")
        super().__init__(
            device=device, use_buffers=False, decay=decay, update_every_n_steps=update_every_n_steps
        )
        self.decay = decay
        self.start_step = start_step
        self._average_model: TrainableAveragedModel | None = None
        self._swapped = False
        self._pending_state: dict[str, Any] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Nothing yet: ``configure_model`` (e.g. DiFuser's head) runs after ``setup`` and the model is moved later."""
        if stage == "fit":
            self._average_model = None
            self._swapped = False
            self._pending_state = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After configure_model, checkpoint loading and the move to the final device.
        named = trainable_parameters(pl_module)
        device = self._device or (named[0][1].device if named else None)
        self._average_model = TrainableAveragedModel(pl_module, device, **self._kwargs)
        if self._pending_state is not None:
            self._restore(pl_module, self._pending_state)
            self._pending_state = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if self._average_model is not None and trainer.global_step <= self.start_step:
            # An average with no members is a plain copy: before start_step the EMA tracks the weights.
            self._average_model.n_averaged.zero_()
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit":  # a later trainer.validate already finds the average in the module
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit":
            super().on_validation_epoch_end(trainer, pl_module)

    def _swap_models(self, pl_module: LightningModule) -> None:
        assert self._average_model is not None
        with torch.no_grad():
            for average, live in zip(
                self._average_model.averaged(), self._average_model.live(pl_module), strict=True
            ):
                kept = live.detach().clone()
                live.copy_(average)
                average.copy_(kept)
        self._swapped = not self._swapped

    def _copy_average_to_current(self, pl_module: LightningModule) -> None:
        """At the end of training the module takes the average; the raw weights are kept aside (a swap, not a copy)
        so a checkpoint written afterwards (e.g. ``last.ckpt`` at ``on_train_end``) still holds both."""
        assert self._average_model is not None and not self._swapped
        self._swap_models(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "latest_update_step": self._latest_update_step,
            "latest_update_epoch": self._latest_update_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_step = state_dict["latest_update_step"]
        self._latest_update_epoch = state_dict.get("latest_update_epoch", -1)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None:
            return  # outside fit the module already holds the final (averaged) weights
        state = checkpoint["state_dict"]
        # While swapped (a save during validation, e.g. on SIGTERM) the module holds the average and vice versa.
        module_values = [state[name] for name in self._average_model.names]
        held_values = [value.detach().clone() for value in self._average_model.averaged()]
        ema_values, raw_values = (
            (module_values, held_values) if self._swapped else (held_values, module_values)
        )
        checkpoint[CHECKPOINT_KEY] = {
            "weights": dict(zip(self._average_model.names, raw_values, strict=True)),
            "n_averaged": self._average_model.n_averaged.detach().clone(),
        }
        state.update(zip(self._average_model.names, ema_values, strict=True))

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != "fit":
            return  # test/validate/predict: state_dict already holds the EMA weights
        # Loaded before on_fit_start builds the average: applied there.
        self._pending_state = {"ema": checkpoint.get(CHECKPOINT_KEY)}

    def _restore(self, pl_module: LightningModule, pending: dict[str, Any]) -> None:
        assert self._average_model is not None
        averaged = self._average_model.averaged()
        live = self._average_model.live(pl_module)
        saved = pending["ema"]
        with torch.no_grad():
            if saved is None:
                rank_zero_warn(
                    "TrainableEMA: the checkpoint has no EMA state; the average restarts from its weights."
                )
                for average, param in zip(averaged, live, strict=True):
                    average.copy_(param)
                return
            missing = [name for name in self._average_model.names if name not in saved["weights"]]
            if missing:
                raise KeyError(f"TrainableEMA: checkpoint's EMA state lacks trainable weights {missing[:5]}")
            # The module was loaded from state_dict, i.e. from the average; put the raw weights back.
            for name, average, param in zip(self._average_model.names, averaged, live, strict=True):
                average.copy_(param)
                param.copy_(saved["weights"][name])
            self._average_model.n_averaged.copy_(saved["n_averaged"])
