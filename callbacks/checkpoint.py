"""Checkpoints that survive crashes and resume exactly.

- ``AtomicCheckpointIO``: Lightning's ``TorchCheckpointIO`` serialises the whole checkpoint into memory and commits
  it through an fsspec transaction, whose local temp file lives in the system temp dir (a cross-device move is a
  copy, so a crash can leave a half-written file) and is never fsynced. Here the checkpoint is streamed into a temp
  file beside the target, fsynced, and renamed over it with ``os.replace``: a reader sees the old or the new file.
- ``LastCheckpoint``: ``last.ckpt`` every N optimizer steps, at every epoch end, and on pre-emption (SIGTERM), in a
  folder that does not depend on the logger's run id so that ``fit --ckpt_path last`` finds it from a new process.
- ``ExactResume``: Lightning restores weights, optimizer, schedulers, loops and callbacks, but not the RNG states nor
  the position inside an epoch of a map-style loader (a fresh ``RandomSampler`` draws a new permutation and the
  resumed epoch starts from its beginning). This callback gives the train loader an epoch-seeded permutation that
  skips the batches already trained on and restores the python/numpy/torch RNG states of the checkpoint.
"""

from __future__ import annotations

import functools
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write local checkpoints to a temp file in the target folder, fsync, then ``os.replace`` it into place."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote stores: fsspec transaction
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(descriptor, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temp_name, target)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps, at each epoch end and on SIGTERM.

    Args:
        every_n_train_steps: period in optimizer steps of the mid-epoch save (0: epoch ends and SIGTERM only).
        dirpath: folder of ``last.ckpt``; default ``<trainer.default_root_dir>/checkpoints``.
        overridable: stand down when the trainer has another ``LastCheckpoint`` (the CLI's default instance yields
            to one a config sets).
    """

    def __init__(self, every_n_train_steps: int = 0, dirpath: str | None = None, overridable: bool = False):
        super().__init__(
            dirpath=dirpath,
            monitor=None,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )
        self.overridable = overridable

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.overridable and any(
            isinstance(callback, LastCheckpoint) and callback is not self for callback in trainer.callbacks
        ):
            self.save_last = False
            self._every_n_train_steps = 0
            return
        self._use_run_folder(trainer)
        super().setup(trainer, pl_module, stage)

    def _use_run_folder(self, trainer: Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        # Called for `ckpt_path="last"` before setup: look in the same folder the saves go to.
        self._use_run_folder(trainer)
        return super()._find_last_checkpoints(trainer)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_train_steps=self._every_n_train_steps, last=True)

    def _saving_allowed(self, trainer: Trainer) -> bool:
        return not trainer.fast_dev_run and trainer.state.fn == "fit" and not trainer.sanity_checking

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        # Lightning checks SIGTERM mid-epoch only under DDP; a single process would otherwise run to the epoch end.
        if trainer.received_sigterm and trainer.world_size == 1:
            raise SIGTERMException()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # An epoch cut short (max_steps, should_stop) keeps its mid-epoch checkpoint: saving here would mark it done.
        epoch_complete = (
            trainer.fit_loop.epoch_loop.batch_progress.current.processed >= trainer.num_training_batches
        )
        if self._saving_allowed(trainer) and epoch_complete:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Only the step period and the epoch end trigger saves."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or not self._saving_allowed(trainer):
            return
        if self._last_global_step_saved != trainer.global_step or self._last_checkpoint_saved is None:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        rank_zero_info(f"SIGTERM: saved {self.last_model_path}; resume with `fit --ckpt_path last`.")


def capture_rng_states() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) random states, as types ``torch.load(weights_only=True)`` reads."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class EpochSeededSampler(Sampler[int]):
    """Permutation drawn from ``(seed, epoch)`` alone (not the global RNG), optionally skipping its first indices.

    ``__len__`` stays the full length so Lightning's batch counts match the uninterrupted run; the skip applies to
    the next iteration only.
    """

    def __init__(self, num_samples: int, shuffle: bool, seed: int, epoch: Callable[[], int], skip: int = 0):
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.skip = skip

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch())
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        yield from order[skip:]


class ExactResume(Callback):
    """Make ``fit --ckpt_path`` continue exactly like the uninterrupted run (single process).

    Covers map-style train loaders built with ``shuffle=True/False`` and a plain ``BatchSampler``, and datasets
    whose ``__getitem__`` is deterministic. Under DDP Lightning's ``DistributedSampler`` (seeded by epoch) is kept
    and RNG states are still restored, but a mid-epoch restart begins the epoch's data again.

    Args:
        seed: base seed of the data order; default the run's ``seed_everything`` seed.
    """

    CHECKPOINT_KEY = "exact_resume"

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self._pending_skip_batches = 0
        self._pending_rng: dict[str, Any] | None = None
        self._patched: tuple[Any, str] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner = trainer.datamodule if trainer.datamodule is not None else pl_module
        build = owner.train_dataloader

        @functools.wraps(build)
        def resumable_train_dataloader() -> Any:
            return self._make_resumable(build(), trainer)

        owner.train_dataloader = resumable_train_dataloader
        self._patched = (owner, "train_dataloader")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._patched is not None:
            owner, name = self._patched
            delattr(owner, name)
            self._patched = None

    def _make_resumable(self, loader: Any, trainer: Trainer) -> Any:
        skip_batches, self._pending_skip_batches = self._pending_skip_batches, 0
        if trainer.world_size > 1:
            return loader  # Lightning replaces the sampler by a DistributedSampler
        batch_sampler = getattr(loader, "batch_sampler", None)
        sampler = getattr(batch_sampler, "sampler", None)
        plain_random = (
            type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None
        )
        if (
            not isinstance(loader, DataLoader)
            or type(batch_sampler) is not BatchSampler
            or not (plain_random or type(sampler) is SequentialSampler)
        ):
            rank_zero_warn(
                "ExactResume: the train loader is not a map-style DataLoader with shuffle=True/False; its data order "
                "is not restored on resume."
            )
            return loader
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        batch_sampler.sampler = EpochSeededSampler(
            len(sampler),
            shuffle=plain_random,
            seed=seed,
            epoch=lambda: trainer.current_epoch,
            skip=skip_batches * batch_sampler.batch_size,
        )
        if loader.generator is None:
            # Worker seeds come from this generator, not from the global RNG whose state the checkpoint restores.
            loader.generator = torch.Generator().manual_seed(seed)
        return loader

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches_done >= trainer.num_training_batches:
            batches_done = 0  # the epoch is complete; the next one starts from its beginning
        checkpoint[self.CHECKPOINT_KEY] = {"rng": capture_rng_states(), "batches_done": batches_done}

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(self.CHECKPOINT_KEY)
        if saved is None:
            rank_zero_warn("ExactResume: the checkpoint has no RNG/data-order state; resuming approximately.")
            return
        self._pending_skip_batches = saved["batches_done"]
        self._pending_rng = saved["rng"]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Last hook before the first resumed step, after the sanity check and loader set-up used randomness.
        if self._pending_rng is not None:
            restore_rng_states(self._pending_rng)
            self._pending_rng = None
