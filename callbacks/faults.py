"""Stop a run on a non-finite loss before it reaches the weights or a checkpoint.

``detect_anomaly`` only finds NaNs produced by backward ops, and training would otherwise go on with NaN weights
and overwrite ``last.ckpt`` with them. The check runs before backward, so the optimizer never applies the bad
step and the last good checkpoint stays the one to resume from.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard(Callback):
    """Raise ``NonFiniteLossError`` (naming the step and the last good checkpoint) when the loss is not finite."""

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        local_bad = not bool(torch.isfinite(loss.detach()).all())
        # Every rank must stop together, or the others would hang in the gradient all-reduce.
        if not trainer.strategy.reduce_boolean_decision(local_bad, all=False):
            return
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
            f"non-finite training loss ({loss.detach().float().item()}) at epoch {trainer.current_epoch}, "
            f"batch {trainer.fit_loop.epoch_loop.batch_idx}, global step {trainer.global_step}; the step was not "
            f"applied and nothing was saved after it ({where})"
        )
