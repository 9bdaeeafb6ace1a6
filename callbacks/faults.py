"""Stop a run on a non-finite loss or gradient before it reaches the weights, and never checkpoint bad weights.

``detect_anomaly`` only finds NaNs produced by backward ops, and training would otherwise go on with NaN weights
and overwrite ``last.ckpt`` with them. The loss is checked before backward and the gradients before the optimizer
step (a finite loss can still give NaN gradients), so the optimizer never applies a bad step; the weights are
checked again before every save, so a non-finite checkpoint never replaces a good one.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.optim import Optimizer


class NonFiniteLossError(RuntimeError):
    """The training loss, a gradient or a weight became NaN or infinite."""


def _non_finite(tensors: list[torch.Tensor]) -> bool:
    floating = [tensor.detach() for tensor in tensors if tensor.is_floating_point()]
    if not floating:
        return False
    return not bool(torch.isfinite(torch.nn.utils.get_total_norm(floating, norm_type=float("inf"))))


class NonFiniteLossGuard(Callback):
    """Raise ``NonFiniteLossError`` (naming the step and the last good checkpoints) on a non-finite loss or gradient,
    and refuse to write a checkpoint with non-finite weights.

    With fp16 loss scaling (``precision: 16-mixed``) infinite gradients are expected and skipped by the scaler, so
    only the loss is checked there.
    """

    def _stop(self, trainer: Trainer, what: str) -> None:
        saved = sorted(
            {
                path
                for callback in trainer.checkpoint_callbacks
                if isinstance(callback, ModelCheckpoint)
                for path in (callback.last_model_path, callback.best_model_path)
                if path
            }
        )
        where = f"last good checkpoints: {', '.join(saved)}" if saved else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"{what} at epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx}, global step "
            f"{trainer.global_step}; the step was not applied and nothing was saved after it ({where})"
        )

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        local_bad = not bool(torch.isfinite(loss.detach()).all())
        # Every rank must stop together, or the others would hang in the gradient all-reduce.
        if trainer.strategy.reduce_boolean_decision(local_bad, all=False):
            self._stop(trainer, f"non-finite training loss ({loss.detach().float().item()})")

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        if str(trainer.precision) == "16-mixed":
            return
        named = [(name, p) for name, p in pl_module.named_parameters() if p.grad is not None]
        local_bad = _non_finite([p.grad for _, p in named])
        if trainer.strategy.reduce_boolean_decision(local_bad, all=False):
            bad = [name for name, p in named if not bool(torch.isfinite(p.grad).all())]
            self._stop(trainer, f"non-finite gradient of {bad[:5]} ({len(bad)} tensors)")

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        weights = dict(checkpoint.get("state_dict", {}))
        weights.update({f"{name} (raw)": p for name, p in pl_module.named_parameters() if p.requires_grad})
        if _non_finite(list(weights.values())):
            bad = [
                name
                for name, value in weights.items()
                if value.is_floating_point() and not value.isfinite().all()
            ]
            raise NonFiniteLossError(
                f"refusing to write a checkpoint at global step {trainer.global_step}: non-finite weights {bad[:5]}; "
                "the previous checkpoint is kept"
            )
