"""A network trained end to end on a GEO-Bench task: SatDiFuser's fully supervised reference rows.

Same datamodule, task fields, loss, metrics and checkpointed task as ``DiFuserModule`` (``GeoBenchTask``); the
network (``networks.supervised``: a ConvNeXt for classification, a UNet for segmentation) is built once the task is
known as ``network(in_channels, num_classes)``, ``in_channels`` the datamodule's band count, from a generator seeded
by the run seed. Every parameter is trained and checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_modules.geobench_task import TASK_FIELDS, GeoBenchTask, accepts, seeded
from metrics.geobench import TaskType


class SupervisedModule(GeoBenchTask):
    """``network(image)`` -> logits, every parameter optimised.

    Args:
        network: builds the network as ``network(in_channels, num_classes)`` (plus ``task_type=`` when it takes
            it: ``networks.supervised.PerTaskNetwork``); called as ``network(image)``, it returns ``(B, K)`` logits (classification, multi-label) or ``(B, K, H, W)`` (segmentation).
        in_channels: input bands; taken from the datamodule (``len(band_names)``), set by hand only without one.
        num_classes, task_type, class_names, ignore_index, dataset_key: taken from the datamodule (CLI links or
            ``configure_model``); set by hand only without one.
        optimizer, scheduler, scheduler_interval, warmup_epochs, warmup_start_lr, min_lr: see ``BaseTask``.
        init_seed: seed of the network initialisation; None uses the run seed (``seed_everything``).
    """

    task_fields = (*TASK_FIELDS, "in_channels")
    required_task_fields = ("task_type", "num_classes", "in_channels")
    hparams_ignore = task_fields

    def __init__(
        self,
        network: Callable[[int, int], nn.Module],
        in_channels: int | None = None,
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
            num_classes=num_classes,
            task_type=task_type,
            class_names=class_names,
            ignore_index=ignore_index,
            dataset_key=dataset_key,
            optimizer=optimizer,
            scheduler=scheduler,
            scheduler_interval=scheduler_interval,
            warmup_epochs=warmup_epochs,
            warmup_start_lr=warmup_start_lr,
            min_lr=min_lr,
            init_seed=init_seed,
        )
        self.task["in_channels"] = in_channels
        self.build_network = network
        self.network: nn.Module | None = None
        self.build_task_parts_if_known()

    def datamodule_task(self, datamodule: Any) -> dict[str, Any]:
        task = super().datamodule_task(datamodule)
        band_names = getattr(datamodule, "band_names", None)
        task["in_channels"] = None if band_names is None else len(band_names)
        return task

    def build_task_parts(self) -> None:
        task_type = {"task_type": self.task["task_type"]} if accepts(self.build_network, "task_type") else {}
        with seeded(self.init_seed):
            self.network = self.build_network(self.task["in_channels"], self.task["num_classes"], **task_type)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """Logits: ``(B, K)`` for (multi-label) classification, ``(B, K, H, W)`` for segmentation."""
        if self.network is None:
            raise RuntimeError(
                "the network is built by configure_model(): run under a Trainer or call it first"
            )
        return self.network(batch["image"])
