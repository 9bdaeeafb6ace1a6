"""SatDiFuser: a frozen diffusion feature extractor, a trainable fusion and a task head (GEO-Bench tasks).

The task, its loss, metrics, steps and checkpointed task come from ``lightning_modules.geobench_task.GeoBenchTask``:
the head is built once the datamodule (or the checkpoint) has told the task. Everything else is saved as
hyperparameters (``lightning_modules.base.BaseTask``): a checkpoint of a CLI run loads with
``DiFuserModule.load_from_checkpoint(path)`` alone, the frozen extractor rebuilt from its config.

Fusion and head are initialised from a generator seeded by the run seed, never from the global RNG at build time:
one process and every DDP rank build the same weights wherever the strategy has moved the RNG.

The extractor is frozen and never checkpointed (``FrozenPartsCheckpointMixin``); with ``cache_dir`` its output is
computed once per sample and read from disk afterwards (``networks.difuser.FeatureCache``): the ``latents`` tier
stores the inverted latents (each epoch runs only the hooked UNet passes), the ``pyramid`` tier the whole pyramid.
``predict`` over every split (``data.init_args.predict_split all``) fills the cache ahead of training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_modules.frozen import FrozenPartsCheckpointMixin
from lightning_modules.geobench_task import GeoBenchTask, accepts, seeded
from metrics.geobench import TaskType
from networks.difuser.cache import CacheDtype, CacheTier, FeatureCache

CHECKPOINT_TASK_KEY = "difuser_task"


def paper_adamw(params) -> torch.optim.Optimizer:
    """The paper's optimiser: AdamW, initial learning rate 0.01."""
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.0)


class DiFuserModule(FrozenPartsCheckpointMixin, GeoBenchTask):
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
    checkpoint_task_key = CHECKPOINT_TASK_KEY

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
        self.extractor = extractor
        layout = {"block_layout": extractor.block_layout} if accepts(fusion, "block_layout") else {}
        with seeded(self.init_seed):
            self.fusion = fusion(extractor.feature_channels, extractor.num_timesteps, **layout)
        if not isinstance(getattr(self.fusion, "out_channels", None), int):
            raise TypeError(f"fusion {type(self.fusion).__name__} must expose an integer `out_channels`")
        self.build_head = head
        self.cache_dir = cache_dir
        self.cache_dtype = cache_dtype
        self.cache_tier = cache_tier
        self.head: nn.Module | None = None
        self.cache: FeatureCache | None = None
        self.build_task_parts_if_known()

    # ---------------------------------------------------------------- set-up from the datamodule / checkpoint
    def build_task_parts(self) -> None:
        with seeded(self.init_seed + 1):
            self.head = self.build_head(self.fusion.out_channels, self.task["num_classes"])

    def configure_model(self) -> None:
        """Build head and metrics (``GeoBenchTask``), then the feature cache, once the task is known."""
        super().configure_model()
        if not self.task_parts_built:
            return
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
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
        super().on_save_checkpoint(checkpoint)  # FrozenPartsCheckpointMixin: the extractor stays out
        self.save_task(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.load_task(checkpoint)
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

    def auxiliary_loss(self) -> Tensor:
        """The fusion's auxiliary loss of the last forward (MoE load balancing; zero for the others)."""
        return self.fusion.aux_loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Tell step-scheduled fusions (MoE routing warm-up) how many optimizer steps were taken."""
        set_training_step = getattr(self.fusion, "set_training_step", None)
        if set_training_step is not None:
            set_training_step(self.global_step)
