"""The skeleton of every GEO-Bench task module: the task, its loss and metrics, and the steps.

The task (type, class count, class names, ignore index, dataset key) comes from the datamodule, not the model
config: either linked into the constructor arguments by the CLI, or read by ``configure_model()`` from
``trainer.datamodule`` (after the datamodule is set up), which then builds the task-dependent parts
(``build_task_parts``: a head, a whole network) and the metrics. Lightning calls ``configure_model()`` before
restoring a checkpoint, so ``test --ckpt_path`` loads the trained weights; the task is also stored in the checkpoint
so ``Module.load_from_checkpoint(path)`` works without a trainer. Task values are not saved as hyperparameters (the
datamodule logs its own; a copy here would clash with it in the logger), only in the checkpoint.

Task-dependent parts are initialised from a generator seeded by the run seed (``init_seed``), never from the
global RNG at build time: one process and every DDP rank build the same weights wherever the strategy has moved
the RNG.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MetricCollection

from lightning_modules.base import BaseTask
from metrics.geobench import TaskType, task_metrics

TASK_FIELDS = ("task_type", "num_classes", "class_names", "ignore_index", "dataset_key")


def accepts(builder: Callable, name: str) -> bool:
    """Whether a class, function or (jsonargparse) partial of one takes keyword ``name``; jsonargparse's partials
    hide the signature but carry every init argument in ``keywords``."""
    if name in getattr(builder, "keywords", {}):
        return True
    try:
        return name in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """A CPU RNG fork seeded with ``seed``: initialisation independent of the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class GeoBenchTask(BaseTask):
    """Task fields, loss, metrics and steps of a GEO-Bench classification, multi-label or segmentation model.

    A subclass implements ``forward(batch)`` (logits ``(B, K)`` or ``(B, K, H, W)``) and ``build_task_parts()``,
    and calls ``build_task_parts_if_known()`` at the end of its constructor.

    Args:
        num_classes, task_type, class_names, ignore_index, dataset_key: taken from the datamodule (CLI links or
            ``configure_model``); set by hand only without one.
        optimizer, scheduler, scheduler_interval, warmup_epochs, warmup_start_lr, min_lr: see ``BaseTask``.
        init_seed: seed of the task-dependent parts' initialisation; None uses the run seed (``seed_everything``).
    """

    task_fields: tuple[str, ...] = TASK_FIELDS
    """Fields adopted from the datamodule (or checkpoint) and stored in the checkpoint."""

    required_task_fields: tuple[str, ...] = ("task_type", "num_classes")
    """Fields ``build_task_parts`` cannot do without."""

    checkpoint_task_key = "geobench_task"
    """Where the task is stored in a checkpoint."""

    hparams_ignore = TASK_FIELDS

    def __init__(
        self,
        num_classes: int | None = None,
        task_type: TaskType | None = None,
        class_names: list[str] | None = None,
        ignore_index: int | None = None,
        dataset_key: str | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        warmup_epochs: float | None = None,
        warmup_start_lr: float = 0.0,
        min_lr: float = 0.0,
        init_seed: int | None = None,
    ):
        super().__init__(
            optimizer=optimizer,
            scheduler=scheduler,
            scheduler_interval=scheduler_interval,
            warmup_epochs=warmup_epochs,
            warmup_start_lr=warmup_start_lr,
            min_lr=min_lr,
        )
        self.init_seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if init_seed is None else init_seed
        given = {
            "task_type": task_type,
            "num_classes": num_classes,
            "class_names": class_names,
            "ignore_index": ignore_index,
            "dataset_key": dataset_key,
        }
        self.task: dict[str, Any] = {field: given.get(field) for field in self.task_fields}
        self.task_parts_built = False

    # ---------------------------------------------------------------- set-up from the datamodule / checkpoint
    def build_task_parts(self) -> None:
        """Build what depends on the task (``self.task`` holds every required field); called once."""
        raise NotImplementedError

    def build_task_parts_if_known(self) -> None:
        """Build at once when the task is complete (linked by the CLI): before any strategy touches the RNG."""
        if all(self.task[field] is not None for field in self.required_task_fields):
            self._build_task_parts()

    def datamodule_task(self, datamodule: Any) -> dict[str, Any]:
        """The task fields a datamodule exposes (None where it lacks one)."""
        return {field: getattr(datamodule, field, None) for field in self.task_fields}

    def _adopt_task(self, source: dict[str, Any], origin: str) -> None:
        """Fill unset task fields from ``source``; a field set on both sides must agree."""
        for field in self.task_fields:
            value = source.get(field)
            if value is None:
                continue
            if self.task[field] is None:
                self.task[field] = value
            elif self.task[field] != value:
                raise ValueError(
                    f"model.init_args.{field}={self.task[field]!r} disagrees with the {origin}'s {value!r}"
                )

    def _build_task_parts(self) -> None:
        missing = [field for field in self.required_task_fields if self.task[field] is None]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs {missing}: use a datamodule exposing them (GeoBenchDataModule) or "
                f"set model.init_args.{missing[0]}"
            )
        self.build_task_parts()
        self.build_metrics()
        self.task_parts_built = True

    def configure_metrics(self) -> MetricCollection:
        """The task's GEO-Bench metrics (``metrics.geobench``), cloned per split by ``build_metrics``."""
        return task_metrics(
            self.task["task_type"],
            self.task["num_classes"],
            self.task["class_names"],
            self.task["ignore_index"],
        )

    def configure_model(self) -> None:
        """Build the task parts and metrics once the datamodule (already set up) has told the task.

        Without a trainer and without a complete task (``load_from_checkpoint`` calls this first) building waits
        for ``on_load_checkpoint``, which reads the task from the checkpoint.
        """
        attached = self._trainer is not None
        datamodule = getattr(self.trainer, "datamodule", None) if attached else None
        if datamodule is not None:
            self._adopt_task(self.datamodule_task(datamodule), "datamodule")
        if not self.task_parts_built:
            if not attached and any(self.task[field] is None for field in self.required_task_fields):
                return
            self._build_task_parts()

    def save_task(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.checkpoint_task_key] = dict(self.task)

    def load_task(self, checkpoint: dict[str, Any]) -> None:
        """Adopt the checkpoint's task and build the task parts before the state dict is loaded into them."""
        self._adopt_task(checkpoint.get(self.checkpoint_task_key, {}), "checkpoint")
        if (
            not self.task_parts_built
        ):  # load_from_checkpoint without a trainer: configure_model was not called
            self._build_task_parts()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self.save_task(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.load_task(checkpoint)
        super().on_load_checkpoint(checkpoint)

    # ---------------------------------------------------------------------------------------------- steps
    def forward(self, batch: dict[str, Any]) -> Tensor:
        """Logits: ``(B, K)`` for (multi-label) classification, ``(B, K, H, W)`` for segmentation."""
        raise NotImplementedError

    def task_loss(self, logits: Tensor, label: Tensor) -> Tensor:
        if self.task["task_type"] == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, label.float())
        ignore_index = self.task["ignore_index"]
        return F.cross_entropy(logits, label, ignore_index=-100 if ignore_index is None else ignore_index)

    def auxiliary_loss(self) -> Tensor | float:
        """A term added to the training loss after each forward (e.g. a fusion's load-balancing loss)."""
        return 0.0

    def _step(self, batch: dict[str, Any], split: str, metrics: MetricCollection) -> Tensor:
        logits = self(batch)
        label = batch["label"]
        loss = self.task_loss(logits, label)
        if split == "train":
            loss = loss + self.auxiliary_loss()
        batch_size = len(batch["sample"])
        self.log(f"{split}/loss", loss, batch_size=batch_size, prog_bar=True, sync_dist=split != "train")
        if self.task["task_type"] == "multilabel":
            metrics.update(logits.sigmoid(), label.long())
        else:
            metrics.update(logits, label)
        return loss

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test", self.test_metrics)
