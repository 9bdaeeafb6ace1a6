"""Warm-up-then-cosine schedules counted in optimizer steps, and the optimizer-step counts of a fit.

Schedules step once per optimizer step (what ``LambdaLR`` with ``interval: step`` and ``trainer.global_step``
count), so their lengths must come from optimizer steps too: ``accumulate_grad_batches``,
``limit_train_batches`` and a ``max_steps`` cap all change them, and an epoch-based length must be converted
with the optimizer steps of one epoch, never with ``total / max_epochs`` (wrong as soon as ``max_steps`` caps).
"""

from __future__ import annotations

import math

from lightning.pytorch import Trainer


def warmup_cosine(step: int, total: int, warmup: int, start: float, peak: float, end: float) -> float:
    """Linear from ``start`` to ``peak`` over ``warmup`` steps, then cosine from ``peak`` to ``end`` at ``total``."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_steps(trainer: Trainer) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``: optimizer steps in one epoch and in the whole fit.

    One epoch of ``num_training_batches`` (already cut by ``limit_train_batches``) steps
    ``ceil(batches / accumulate_grad_batches)`` times (Lightning steps on an epoch's last, partial
    accumulation too); the total is Lightning's ``estimated_stepping_batches`` (epochs, capped by ``max_steps``).
    """
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    total = trainer.estimated_stepping_batches
    if math.isinf(batches) or math.isinf(total):
        raise ValueError(
            "the warm-up/cosine schedules need a finite run: set trainer.max_steps, or trainer.max_epochs with "
            "a sized training dataloader"
        )
    steps_per_epoch = max(math.ceil(batches / trainer.accumulate_grad_batches), 1)
    return steps_per_epoch, max(int(total), 1)
