"""The one skeleton every satdiff task shares (torchgeo's trainer pattern, for injected networks).

- Hyperparameters: under LightningCLI a module's hyperparameters are its config (``class_path``/``init_args``
  dicts of every injected network and callable, plus Lightning's ``_instantiator``), so
  ``Module.load_from_checkpoint(path)`` rebuilds the whole module, frozen parts included, from the checkpoint alone.
  Built directly (tests, notebooks) the networks are objects: only plain values (numbers, strings, lists of them)
  are saved and the objects are passed again to ``load_from_checkpoint``. ``hparams_ignore`` names arguments that
  are never saved (DiFuser's task fields, which the datamodule reports and logs itself).
- Optimisation: ``optimizer`` is an injected callable applied to ``parameter_groups()``; the learning rate follows
  either an injected ``scheduler`` callable (stepped every ``scheduler_interval``, monitoring ``val/loss``) or,
  with ``warmup_epochs`` set, the shared per-optimizer-step warm-up-then-cosine of ``lightning_modules.schedules``:
  linear from ``warmup_start_lr`` to each group's learning rate over ``warmup_epochs`` epochs of optimizer steps,
  then cosine to ``min_lr`` at the fit's last optimizer step. A module with nothing to train returns no optimizer
  and must use manual optimization (``BaselineForecastModule`` with persistence).
- Metrics: ``configure_metrics()`` returns one collection, cloned once per split in ``metric_splits`` as
  ``train_metrics`` / ``val_metrics`` / ``test_metrics`` with ``train/``, ``val/``, ``test/`` prefixes;
  ``epoch_metrics`` computes and resets a split at its epoch end, logged there by this class.
- Parts named in ``eval_module_names`` stay in eval mode on purpose (a frozen extractor, an EMA target encoder:
  their ``train()`` keeps them there); Lightning's warning about modules in eval mode at the start of training is
  silenced when they are the only ones.
"""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities.parsing import collect_init_args
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import Metric, MetricCollection

from lightning_modules.schedules import optimizer_steps, warmup_cosine

SPLITS = ("train", "val", "test")


def is_plain(value: Any) -> bool:
    """Whether ``value`` is configuration data (what a YAML file holds), not an object to pickle."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_plain(item) for key, item in value.items())
    return False


def constructor_arguments(frame) -> dict[str, Any]:
    """The arguments of every ``__init__`` in the constructor chain running at ``frame`` (the outermost wins)."""
    arguments: dict[str, Any] = {}
    for local_args in collect_init_args(frame, [], classes=(LightningModule,)):
        arguments.update(local_args)
    return arguments


class BaseTask(LightningModule):
    """Hyperparameters, optimizer and learning-rate schedule, and per-split metrics of every satdiff task.

    Args:
        optimizer: builds the optimizer from ``parameter_groups()`` (class_path/init_args in a config); None:
            AdamW with torch's defaults.
        scheduler: optional learning-rate scheduler built on the optimizer, stepped every ``scheduler_interval``
            (``epoch`` or ``step``); exclusive with ``warmup_epochs``.
        warmup_epochs: epochs of linear warm-up (converted to optimizer steps) before the cosine decay; None: no
            warm-up/cosine schedule.
        warmup_start_lr, min_lr: learning rate at the first optimizer step and at the last.
    """

    hparams_ignore: tuple[str, ...] = ()
    """Constructor arguments never saved as hyperparameters."""

    metric_splits: tuple[str, ...] = SPLITS
    """Splits that get a clone of ``configure_metrics()``."""

    eval_module_names: tuple[str, ...] = ()
    """Attributes holding parts that stay in eval mode during training on purpose."""

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        warmup_epochs: float | None = None,
        warmup_start_lr: float = 0.0,
        min_lr: float = 0.0,
    ):
        super().__init__()
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        if scheduler is not None and warmup_epochs is not None:
            raise ValueError(
                "model.init_args.scheduler and model.init_args.warmup_epochs both set a learning-rate schedule: "
                "set warmup_epochs to null to use the scheduler"
            )
        if warmup_epochs is not None and warmup_epochs < 0:
            raise ValueError(f"model.init_args.warmup_epochs must be >= 0 or null, got {warmup_epochs}")
        self.save_task_hyperparameters(inspect.currentframe())
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.warmup_epochs = warmup_epochs
        self.warmup_start_lr = warmup_start_lr
        self.min_lr = min_lr

    # ----- hyperparameters ---------------------------------------------------------------------------------
    def save_task_hyperparameters(self, frame) -> None:
        """Save the config LightningCLI built this module from, else the plain constructor arguments.

        LightningCLI hands ``save_hyperparameters`` the module's config while it builds the module (Lightning's
        ``_given_hyperparameters``); only then are the networks config dicts rather than objects.
        """
        given = _given_hyperparameters.get()
        saved = given if given is not None else constructor_arguments(frame)
        objects = [name for name, value in saved.items() if not is_plain(value)]
        self.save_hyperparameters(ignore=[*self.hparams_ignore, *objects], frame=frame)

    # ----- parts in eval mode on purpose ------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Silence Lightning's "module(s) in eval mode at the start of training" warning when the only modules in
        eval mode belong to ``eval_module_names``, where it is wrong. Only that exact count is silenced, and only
        until training starts (``on_train_start``): any other module in eval mode still warns."""
        super().on_fit_start()
        in_eval = [name for name, module in self.named_modules() if not module.training]
        if in_eval and all(name.split(".")[0] in self.eval_module_names for name in in_eval):
            scope = warnings.catch_warnings()
            scope.__enter__()
            warnings.filterwarnings(
                "ignore",
                message=re.escape(f"Found {len(in_eval)} module(s) in eval mode at the start of training"),
                category=PossibleUserWarning,
            )
            self.__dict__["_eval_mode_warning_scope"] = scope

    def on_train_start(self) -> None:
        super().on_train_start()
        scope = self.__dict__.pop("_eval_mode_warning_scope", None)
        if scope is not None:
            scope.__exit__(None, None, None)

    # ----- metrics -----------------------------------------------------------------------------------------
    def configure_metrics(self) -> MetricCollection | None:
        """The metrics of one split (None: none); ``build_metrics`` clones them per split."""
        return None

    def build_metrics(self) -> None:
        """``<split>_metrics`` for every split in ``metric_splits``, each a prefixed clone (torchgeo's pattern)."""
        metrics = self.configure_metrics()
        if metrics is None:
            return
        for split in self.metric_splits:
            setattr(self, f"{split}_metrics", metrics.clone(prefix=f"{split}/"))

    @staticmethod
    def epoch_metrics(metrics: MetricCollection | dict[str, Metric]) -> dict[str, Tensor]:
        """Compute the metrics updated this epoch (already reduced over ranks by torchmetrics), then reset all."""
        if isinstance(metrics, MetricCollection):
            updated = any(metric.update_count for metric in metrics.values())
            values = dict(metrics.compute()) if updated else {}
        else:
            values = {name: metric.compute() for name, metric in metrics.items() if metric.update_count}
        for metric in metrics.values():
            metric.reset()
        return values

    def log_epoch_metrics(self, split: str) -> None:
        metrics = getattr(self, f"{split}_metrics", None)
        if metrics is not None:
            self.log_dict(self.epoch_metrics(metrics))

    def on_train_epoch_end(self) -> None:
        self.log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")

    # ----- optimisation ------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[Any]:
        """What the optimizer trains: every parameter that requires grad (a subclass may return groups)."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        groups = self.parameter_groups()
        if not groups:
            if self.automatic_optimization:
                raise ValueError(f"{type(self).__name__} has no trainable parameter to optimise")
            return []  # manual optimization of nothing: fit only logs, validates and checkpoints
        optimizer = (self.optimizer or torch.optim.AdamW)(groups)
        if self.scheduler is not None:
            scheduler = {"scheduler": self.scheduler(optimizer), "interval": self.scheduler_interval}
            return {"optimizer": optimizer, "lr_scheduler": {**scheduler, "monitor": "val/loss"}}
        if self.warmup_epochs is None:
            return optimizer
        scheduler = {"scheduler": self.warmup_cosine_scheduler(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def schedule_steps(self) -> tuple[int, int]:
        """Total optimizer steps of this fit and warm-up steps (``warmup_epochs`` epochs of optimizer steps)."""
        steps_per_epoch, total = optimizer_steps(self.trainer)
        return total, min(round((self.warmup_epochs or 0) * steps_per_epoch), total)

    def warmup_cosine_scheduler(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        """Per optimizer step: ``warmup_start_lr`` -> each group's learning rate -> ``min_lr`` (cosine)."""
        total, warmup = self.schedule_steps()
        start, end = self.warmup_start_lr, self.min_lr

        def factor(peak: float):
            return lambda step: warmup_cosine(step, total, warmup, start, peak, end) / peak

        return LambdaLR(optimizer, [factor(group["lr"]) for group in optimizer.param_groups])
