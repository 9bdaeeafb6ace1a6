"""SatDiFuser: a frozen diffusion feature extractor, a trainable fusion and a task head (GEO-Bench tasks).

The task (type, class count, class names, ignore index, dataset key) comes from the datamodule, not the model
config: either linked into the constructor arguments by the CLI, or read by ``configure_model()`` from
``trainer.datamodule`` (after the datamodule is set up), which then builds the head, the metrics and the feature
cache. Lightning calls ``configure_model()`` before restoring a checkpoint, so ``test --ckpt_path`` loads the trained
fusion and head; the task is also stored in the checkpoint so ``DiFuserModule.load_from_checkpoint`` works without a
trainer. Task values are not saved as hyperparameters (the datamodule logs its own; a copy here would clash with it
in the logger), only in the checkpoint. Everything else is (``lightning_modules.base.BaseTask``): a checkpoint
of a CLI run loads with ``DiFuserModule.load_from_checkpoint(path)`` alone, the frozen extractor rebuilt from its
config.

Fusion and head are initialised from a generator seeded by the run seed, never from the global RNG at build time:
one process and every DDP rank build the same weights wherever the strategy has moved the RNG.

The extractor is frozen and never checkpointed (``FrozenPartsCheckpointMixin``); with ``cache_dir`` its output is
computed once per sample and read from disk afterwards (``networks.difuser.FeatureCache``): the ``latents`` tier
stores the inverted latents (each epoch runs only the hooked UNet passes), the ``pyramid`` tier the whole pyramid.
``predict`` over every split (``data.init_args.predict_split all``) fills the cache ahead of training.
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
from torch import Tensor, nn
from torchmetrics import MetricCollection

from lightning_modules.base import BaseTask
from lightning_modules.frozen import FrozenPartsCheckpointMixin
from metrics.geobench import TaskType, task_metrics
from networks.difuser.cache import CacheDtype, CacheTier, FeatureCache

TASK_FIELDS = ("task_type", "num_classes", "class_names", "ignore_index", "dataset_key")
CHECKPOINT_TASK_KEY = "difuser_task"


def _accepts(builder: Callable, name: str) -> bool:
    """Whether a class, function or (jsonargparse) partial of one takes keyword ``name``; jsonargparse's partials
    hide the signature but carry every init argument in ``keywords``."""
    if name in getattr(builder, "keywords", {}):
        return True
    try:
        return name in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """A CPU RNG fork seeded with ``seed``: initialisation independent of the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def paper_adamw(params) -> torch.optim.Optimizer:
    """The paper's optimiser: AdamW, initial learning rate 0.01."""
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.0)


class DiFuserModule(FrozenPartsCheckpointMixin, BaseTask):
    """Frozen ``extractor`` -> trainable ``fusion`` -> ``head``; only fusion and head are optimised and saved.

    Args:
        extractor: the frozen pyramid extractor (``networks.difuser.DiffusionFeatureExtractor``).
        fusion: builds the fusion as ``fusion(feature_channels, num_timesteps)`` (plus ``block_layout=`` the
            extractor's, when the fusion takes it); it must expose ``out_channels`` and, after each forward,
            ``aux_loss`` (added to the training loss).
        head: builds the head as ``head(in_channels, num_classes)``, called as ``head(fused, (H, W))``.
        num_classes, task_type, class_names, ignore_index, dataset_key: taken from the datamodule (CLI links or
            ``configure_model``); set by hand only without one.
        optimizer: optimiser of the fusion and head parameters (paper: AdamW, lr 0.01).
        scheduler, scheduler_interval: an own learning-rate scheduler instead of the warm-up/cosine (needs
            ``warmup_epochs: null``).
        warmup_epochs, warmup_start_lr, min_lr: linear warmup from ``warmup_start_lr`` to the optimiser's lr over
            ``warmup_epochs`` epochs, then cosine decay to ``min_lr`` at the end of the fit (paper: 5 epochs from
            2e-5, to 1e-5). Stepped per optimizer step, the epochs converted with the optimizer steps of one epoch
            (``BaseTask``): at every epoch boundary the rate is the paper's per-epoch value.
        cache_dir: folder of the feature cache; None extracts features at every step.
        cache_dtype: storage precision of cached values.
        cache_tier: ``latents`` (inverted latents, ~24 KB per 256 px sample) or ``pyramid`` (~21 MB).
        init_seed: seed of the fusion and head initialisation; None uses the run seed (``seed_everything``).
    """

    frozen_module_names = ("extractor",)
    eval_module_names = ("extractor",)
    hparams_ignore = TASK_FIELDS

    def __init__(
        self,
        extractor: nn.Module,
        fusion: Callable[[list[list[int]], int], nn.Module],
        head: Callable[[int, int], nn.Module],
        num_classes: int | None = None,
        task_type: TaskType | None = None,
        class_names: list[str] | None = None,
        ignore_index: int | None = None,
        dataset_key: str | None = None,
        optimizer: OptimizerCallable = paper_adamw,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        warmup_epochs: float | None = 5,
        warmup_start_lr: float = 2e-5,
        min_lr: float = 1e-5,
        cache_dir: str | None = None,
        cache_dtype: CacheDtype = "float16",
        cache_tier: CacheTier = "latents",
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
        self.extractor = extractor
        self.init_seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if init_seed is None else init_seed
        layout = {"block_layout": extractor.block_layout} if _accepts(fusion, "block_layout") else {}
        with _seeded(self.init_seed):
            self.fusion = fusion(extractor.feature_channels, extractor.num_timesteps, **layout)
        if not isinstance(getattr(self.fusion, "out_channels", None), int):
            raise TypeError(f"fusion {type(self.fusion).__name__} must expose an integer `out_channels`")
        self.build_head = head
        self.cache_dir = cache_dir
        self.cache_dtype = cache_dtype
        self.cache_tier = cache_tier
        self.task: dict[str, Any] = {
            "task_type": task_type,
            "num_classes": num_classes,
            "class_names": class_names,
            "ignore_index": ignore_index,
            "dataset_key": dataset_key,
        }
        self.head: nn.Module | None = None
        self.cache: FeatureCache | None = None
        if all(self.task[field] is not None for field in ("task_type", "num_classes")):
            self._build_task_parts()  # linked by the CLI: built before any strategy touches the RNG

    # ---------------------------------------------------------------- set-up from the datamodule / checkpoint
    def _adopt_task(self, source: dict[str, Any], origin: str) -> None:
        """Fill unset task fields from ``source``; a field set on both sides must agree."""
        for field in TASK_FIELDS:
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
        missing = [field for field in ("task_type", "num_classes") if self.task[field] is None]
        if missing:
            raise ValueError(
                f"DiFuserModule needs {missing}: use a datamodule exposing them (GeoBenchDataModule) or set "
                f"model.init_args.{missing[0]}"
            )
        with _seeded(self.init_seed + 1):
            self.head = self.build_head(self.fusion.out_channels, self.task["num_classes"])
        self.build_metrics()

    def configure_metrics(self) -> MetricCollection:
        """The task's GEO-Bench metrics (``metrics.geobench``), cloned per split by ``build_metrics``."""
        return task_metrics(
            self.task["task_type"],
            self.task["num_classes"],
            self.task["class_names"],
            self.task["ignore_index"],
        )

    def configure_model(self) -> None:
        """Build head, metrics and cache once the datamodule (already set up) has told the task.

        Without a trainer and without a complete task (``load_from_checkpoint`` calls this first) building waits
        for ``on_load_checkpoint``, which reads the task from the checkpoint.
        """
        attached = self._trainer is not None
        datamodule = getattr(self.trainer, "datamodule", None) if attached else None
        if datamodule is not None:
            self._adopt_task({field: getattr(datamodule, field, None) for field in TASK_FIELDS}, "datamodule")
        if self.head is None:
            if not attached and any(self.task[field] is None for field in ("task_type", "num_classes")):
                return
            self._build_task_parts()
        if self.cache_dir is not None and self.cache is None:
            if getattr(datamodule, "random_augmentation", False):
                raise ValueError(
                    "model.init_args.cache_dir is set but the datamodule applies random augmentation: cached "
                    "features would freeze one draw; set cache_dir to null"
                )
            if self.task["dataset_key"] is None:
                raise ValueError(
                    "model.init_args.cache_dir is set but no dataset_key is known: use a datamodule exposing "
                    "dataset_key or set model.init_args.dataset_key"
                )
            self.cache = FeatureCache(
                self.cache_dir, self.task["dataset_key"], self.extractor, self.cache_dtype, self.cache_tier
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_TASK_KEY] = dict(self.task)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._adopt_task(checkpoint.get(CHECKPOINT_TASK_KEY, {}), "checkpoint")
        if self.head is None:  # load_from_checkpoint without a trainer: configure_model was not called
            self._build_task_parts()
        super().on_load_checkpoint(checkpoint)

    # ---------------------------------------------------------------------------------------------- steps
    def features(self, batch: dict[str, Any]) -> list[list[Tensor]]:
        """The frozen pyramid of the batch: from the cache when configured, else extracted now."""
        if self.cache is None:
            return self.extractor(batch["image"])
        return self.cache.features(list(batch["sample"]), batch["image"])

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """Logits: ``(B, K)`` for (multi-label) classification, ``(B, K, H, W)`` for segmentation."""
        if self.head is None:
            raise RuntimeError("the head is built by configure_model(): run under a Trainer or call it first")
        fused = self.fusion(self.features(batch))
        return self.head(fused, tuple(batch["image"].shape[-2:]))

    def task_loss(self, logits: Tensor, label: Tensor) -> Tensor:
        if self.task["task_type"] == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, label.float())
        ignore_index = self.task["ignore_index"]
        return F.cross_entropy(logits, label, ignore_index=-100 if ignore_index is None else ignore_index)

    def _step(self, batch: dict[str, Any], split: str, metrics: MetricCollection) -> Tensor:
        logits = self(batch)
        label = batch["label"]
        loss = self.task_loss(logits, label)
        if split == "train":
            loss = loss + self.fusion.aux_loss
        batch_size = len(batch["sample"])
        self.log(f"{split}/loss", loss, batch_size=batch_size, prog_bar=True, sync_dist=split != "train")
        if self.task["task_type"] == "multilabel":
            metrics.update(logits.sigmoid(), label.long())
        else:
            metrics.update(logits, label)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Tell step-scheduled fusions (MoE routing warm-up) how many optimizer steps were taken."""
        set_training_step = getattr(self.fusion, "set_training_step", None)
        if set_training_step is not None:
            set_training_step(self.global_step)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Logits; with a feature cache, predicting over every split fills it ahead of training."""
        return self(batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test", self.test_metrics)
