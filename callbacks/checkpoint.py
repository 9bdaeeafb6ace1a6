"""Checkpoints that survive crashes and pre-emption and resume exactly, with loader workers and DDP ranks.

- ``AtomicCheckpointIO``: Lightning's ``TorchCheckpointIO`` serialises the whole checkpoint into memory and commits
  it through an fsspec transaction, whose local temp file lives in the system temp dir (a cross-device move is a
  copy, so a crash can leave a half-written file) and is never fsynced. Here the checkpoint is streamed into a temp
  file beside the target, fsynced, and renamed over it with ``os.replace``: a reader sees the old or the new file.
- ``LastCheckpoint``: ``last.ckpt`` every N optimizer steps, at every epoch end (after validation, recording the
  best checkpoint of that epoch), at the end of training (``max_steps``, ``max_time``) and on pre-emption (SIGTERM,
  SIGINT, agreed by all ranks at a batch end), in a folder that does not depend on the logger's run id so that
  ``fit --ckpt_path last`` finds it from a new process.
- ``ExactResume``: Lightning restores weights, optimizer, schedulers, loops and callbacks, but not the RNG states nor
  the position inside an epoch of a map-style loader (a fresh sampler draws a new permutation and the resumed epoch
  starts from its beginning, on every rank). This callback gives the train loader an epoch-seeded, per-rank order
  that skips the batches already trained on, seeds each sample's randomness from ``(seed, epoch, index)`` (so the
  worker that loads it does not matter), gives each DDP rank its own RNG stream and restores every rank's RNG states.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.data import _update_dataloader
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
)

from fileio import atomic_open


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, zero-filled, overwritten)."""


def _looks_corrupt(error: BaseException) -> bool:
    message = str(error)
    return isinstance(error, (EOFError, zipfile.BadZipFile)) or any(
        marker in message
        for marker in ("PytorchStreamReader", "invalid load key", "corrupt", "unexpected EOF")
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write local checkpoints through ``fileio.atomic_open`` (temp file in the target folder, fsync, rename).

    Temp files left by a killed write (``.<name>.*.tmp``) are removed at the next write of that name; the file gets
    the mode a normal file would (umask applied) so group members of a shared cluster folder can read it. Loading names the file and says it is corrupt when it is not a complete
    torch archive, instead of torch's message (which for a zero-filled file suggests an unsafe ``weights_only=False``).
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote stores: fsspec transaction
            return
        with atomic_open(path, "wb") as stream:
            torch.save(checkpoint, stream)

    def load_checkpoint(self, path: _PATH, *args: Any, **kwargs: Any) -> dict[str, Any]:
        local = "://" not in str(path) and Path(path).is_file()
        if local and not zipfile.is_zipfile(path):
            raise CorruptCheckpointError(
                f"checkpoint {path} is corrupt: not a complete torch archive (truncated, zero-filled or "
                "overwritten); resume from another checkpoint"
            )
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except Exception as error:
            if not _looks_corrupt(error):
                raise
            reason = str(error).split(". ")[0]
            raise CorruptCheckpointError(
                f"checkpoint {path} is corrupt ({reason}); resume from another checkpoint"
            ) from None


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps, at each epoch end, at the end of training and on
    pre-emption (SIGTERM, SIGINT).

    Pre-emption: SLURM and torchrun signal every rank, Lightning's launcher forwards rank 0's signal, and Lightning's
    own SIGTERM handler runs a collective inside the handler, which deadlocks against a rank that is in another
    collective. Here the handler only sets a flag (a second SIGINT interrupts at once); at the next batch end the
    ranks agree (any rank signalled stops all), ``last.ckpt`` is written once and every rank exits with status 0.
    On an epoch's last batch the stop (like the periodic save) waits for the epoch's validation and end hooks, so a
    restart does not skip them.

    Args:
        every_n_train_steps: period in optimizer steps of the mid-epoch save (0: epoch ends and signals only).
        dirpath: folder of ``last.ckpt``; default ``<trainer.default_root_dir>/checkpoints``.
        overridable: stand down when the trainer has another ``LastCheckpoint`` (the CLI's default instance yields
            to one a config sets).
    """

    STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

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
        self._stop_signal: str | None = None
        self._stop_after_epoch = False
        self._active = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.overridable and any(
            isinstance(callback, LastCheckpoint) and callback is not self for callback in trainer.callbacks
        ):
            self.save_last = False
            self._every_n_train_steps = 0
            return
        self._use_run_folder(trainer)
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._active = True
            self._stop_signal = None
            self._stop_after_epoch = False
            self._take_over_stop_signals(trainer)
            # Run after every other callback, so last.ckpt records the best checkpoint that the monitoring
            # ModelCheckpoint saves at this same epoch end. A new list: the running setup loop keeps the old one.
            trainer.callbacks = [callback for callback in trainer.callbacks if callback is not self] + [self]

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        trainer._signal_connector.__dict__.pop("register_signal_handlers", None)
        self._active = False

    def _take_over_stop_signals(self, trainer: Trainer) -> None:
        """Install the flag-only handler where Lightning installs its own (right before the loops run)."""
        connector = trainer._signal_connector
        register_lightning_handlers = type(connector).register_signal_handlers.__get__(connector)

        def register_signal_handlers() -> None:
            register_lightning_handlers()  # SLURM requeue handler; remembers the handlers to restore at teardown
            if threading.current_thread() is threading.main_thread():
                for signum in self.STOP_SIGNALS:
                    signal.signal(signum, self._request_stop)

        connector.register_signal_handlers = register_signal_handlers

    def _request_stop(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self._stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl+C: stop now, without a checkpoint
        self._stop_signal = signal.Signals(signum).name

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

    @staticmethod
    def _epoch_complete(trainer: Trainer) -> bool:
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed >= trainer.num_training_batches

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if not self._active:
            return
        # On the epoch's last batch, the epoch-end save (after validation) replaces the periodic one: Lightning
        # treats a checkpoint written here as a finished epoch and would skip validation and epoch-end hooks.
        last_batch = self._epoch_complete(trainer)
        if not last_batch:
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self._stop_after_epoch or not trainer.strategy.reduce_boolean_decision(
            self._stop_signal is not None, all=False
        ):
            return
        signalled = self._stop_signal or "a signal to another rank"
        if last_batch:  # validation and the epoch end first; the flag would make Lightning stop validating
            rank_zero_info(f"{signalled}: stopping after this epoch's validation and end hooks.")
            self._stop_after_epoch = True
            return
        self._save_if_new(trainer)
        self._stop(trainer, signalled)

    def _stop(self, trainer: Trainer, signalled: str) -> None:
        rank_zero_info(f"{signalled}: stopping; resume with `fit --ckpt_path last` ({self.last_model_path}).")
        # Lightning raises SIGTERMException (exit status 0) on every rank at its next check: right after this batch,
        # or right after the epoch end.
        trainer._signal_connector.received_sigterm = True

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # An epoch cut short (max_steps, should_stop) keeps its mid-epoch checkpoint: saving here would mark it done.
        if self._active and self._saving_allowed(trainer) and self._epoch_complete(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self._stop_after_epoch:
            self._stop_after_epoch = False
            self._stop(trainer, self._stop_signal or "a signal to another rank")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A run ending mid-epoch (``max_steps``, ``max_time``) keeps its last steps."""
        if self._active:
            self._save_if_new(trainer)

    def _save_if_new(self, trainer: Trainer) -> None:
        if self._saving_allowed(trainer) and (
            self._last_global_step_saved != trainer.global_step or not self._last_checkpoint_saved
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Only the step period, the epoch end, the end of training and signals trigger saves."""


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


class EpochSeededSampler(DistributedSampler):
    """``DistributedSampler``'s order (from ``(seed, epoch)`` alone, padded, every ``num_replicas``-th index from
    ``rank``) as ``(epoch, index)`` keys (or plain indices), optionally skipping this rank's first ones.

    A ``DistributedSampler``, so Lightning keeps it under DDP instead of swapping in its own; ``__len__`` stays this
    rank's full share so Lightning's batch counts match the uninterrupted run. The skip belongs to ``skip_epoch``
    (the epoch the checkpoint was saved in) and applies to the first iteration of that epoch only: an iteration of
    another epoch, started before Lightning restored its loops, must not use it up. ``drawn_epoch`` is the epoch
    the latest iteration drew its order for (None before the first index is drawn).
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool,
        seed: int,
        epoch: Callable[[], int],
        num_replicas: int = 1,
        rank: int = 0,
        skip: int = 0,
        skip_epoch: int = 0,
        epoch_keys: bool = True,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.current_epoch = epoch
        self.skip = skip
        self.skip_epoch = skip_epoch
        self.epoch_keys = epoch_keys
        self.drawn_epoch: int | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        epoch = self.current_epoch()
        self.drawn_epoch = epoch
        skip = 0
        if epoch == self.skip_epoch:
            skip, self.skip = self.skip, 0
        self.set_epoch(epoch)
        for index in list(super().__iter__())[skip:]:
            yield (epoch, index) if self.epoch_keys else index


class SeededSamples(Dataset):
    """Loads ``dataset[index]`` for an ``(epoch, index)`` key with the torch/numpy/python RNGs seeded from
    ``(seed, epoch, index)``.

    Random augmentation that draws from the global RNGs then depends neither on the worker that loads the sample
    (skipping done batches on resume shifts it), nor on the worker seeds (redrawn at every restart and, with
    persistent workers, carried across epochs), nor on the process's own stream (forked, left untouched).
    Attributes not defined here are the wrapped dataset's.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        torch_seed, other_seed = np.random.SeedSequence([self.seed % 2**63, epoch, index]).generate_state(2)
        numpy_state, python_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(torch_seed))  # CPU only: the process's CUDA stream stays
            np.random.seed(int(other_seed))
            random.seed(int(other_seed))
            try:
                return self.dataset[index]
            finally:
                np.random.set_state(numpy_state)
                random.setstate(python_state)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "seed"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ExactResume(Callback):
    """Make ``fit --ckpt_path`` continue exactly like the uninterrupted run, with loader workers and DDP ranks.

    For map-style train loaders whose batch sampler draws from a ``RandomSampler`` or ``SequentialSampler``
    (``shuffle=True/False``), the loader is rebuilt with an ``EpochSeededSampler`` (the data order of Lightning's
    ``DistributedSampler``, which resumes at this rank's next batch) giving ``(epoch, index)`` keys to the dataset:
    one that takes them (``takes_epoch_keys``) seeds its own randomness, any other is wrapped in ``SeededSamples``. Under DDP each rank gets its own RNG stream
    (``seed + rank``, set after DDP set-up) for noise, masks and dropout; the checkpoint holds every rank's RNG
    states and each rank restores its own. A train iterator made before Lightning restores its loops (a module
    reading ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` sets the loader up then), whose
    workers prefetch epoch 0's samples at once, is restarted at ``on_train_start`` on the epoch that resumes.

    Args:
        seed: base seed of the data order and sample RNGs; default the run's ``seed_everything`` seed.
    """

    CHECKPOINT_KEY = "exact_resume"

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self._pending_skip: tuple[int, int] = (0, 0)  # (epoch, batches already trained in it)
        self._pending_rng: dict[str, Any] | None = None
        self._patched: tuple[Any, str] | None = None
        self._order: EpochSeededSampler | None = None

    def _base_seed(self) -> int:
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._pending_rng = None
        self._order = None
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
        (skip_epoch, skip_batches), self._pending_skip = self._pending_skip, (0, 0)
        batch_sampler = getattr(loader, "batch_sampler", None)
        sampler = getattr(batch_sampler, "sampler", None)
        plain_random = (
            type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None
        )
        if (
            not isinstance(loader, DataLoader)
            or not isinstance(batch_sampler, BatchSampler)
            or not (plain_random or type(sampler) is SequentialSampler)
        ):
            rank_zero_warn(
                "ExactResume: the train loader is not a map-style DataLoader with shuffle=True/False; its data order "
                "and sample randomness are not restored on resume."
            )
            return loader
        # Samples are drawn from (seed, epoch, index) keys: by the dataset itself when it takes such keys, else
        # through SeededSamples, which needs a plain DataLoader to be rebuilt around it.
        epoch_keys = getattr(loader.dataset, "takes_epoch_keys", False) or type(loader) is DataLoader
        if not epoch_keys:
            rank_zero_warn(
                f"ExactResume: {type(loader).__name__} over {type(loader.dataset).__name__}: the data order is resumed, "
                "but randomness the dataset draws in loader workers is not (give the dataset `takes_epoch_keys`)."
            )
        seed = self._base_seed()
        if epoch_keys and not getattr(loader.dataset, "takes_epoch_keys", False):
            batching = (
                {
                    "batch_size": batch_sampler.batch_size,
                    "drop_last": batch_sampler.drop_last,
                    "sampler": sampler,
                }
                if type(batch_sampler) is BatchSampler
                else {
                    "batch_sampler": batch_sampler
                }  # a subclass: Lightning rebuilds it from its saved arguments
            )
            loader = DataLoader(
                SeededSamples(loader.dataset, seed),
                **batching,
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
                pin_memory=loader.pin_memory,
                timeout=loader.timeout,
                worker_init_fn=loader.worker_init_fn,
                multiprocessing_context=loader.multiprocessing_context,
                generator=loader.generator,
                prefetch_factor=loader.prefetch_factor,
                persistent_workers=loader.persistent_workers,
                pin_memory_device=loader.pin_memory_device,
                in_order=loader.in_order,
            )
        order = EpochSeededSampler(
            loader.dataset,
            shuffle=plain_random,
            seed=seed,
            epoch=lambda: trainer.current_epoch,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            skip=skip_batches * batch_sampler.batch_size,
            skip_epoch=skip_epoch,
            epoch_keys=epoch_keys,
        )
        self._order = order
        # Lightning's own re-instantiation (as for DDP), keeping DataLoader and BatchSampler subclasses.
        loader = _update_dataloader(loader, order, mode=RunningStage.TRAINING)
        if loader.sampler is not order:
            # A custom batch sampler now draws from `order`, but torch gives the loader a placeholder `sampler`, by
            # which Lightning (under DDP) would judge that a DistributedSampler is still missing and replace `order`.
            object.__setattr__(loader, "sampler", order)
        if loader.generator is None:
            # Each epoch's iterator draws its worker base seed from this generator, else from the global RNG: a run
            # resumed from an epoch-end checkpoint would be one draw behind the uninterrupted run.
            loader.generator = torch.Generator().manual_seed(seed)
        return loader

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches_done >= trainer.num_training_batches:
            batches_done = 0  # the epoch is complete; the next one starts from its beginning
        states = capture_rng_states()
        if trainer.world_size > 1:  # every rank dumps the checkpoint; rank 0 writes all ranks' streams
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
            rank_states = gathered
        else:
            rank_states = [states]
        checkpoint[self.CHECKPOINT_KEY] = {"rng": rank_states, "batches_done": batches_done}

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test/predict of a checkpoint resume no training stream
        saved = checkpoint.get(self.CHECKPOINT_KEY)
        if saved is None:
            rank_zero_warn("ExactResume: the checkpoint has no RNG/data-order state; resuming approximately.")
            return
        self._pending_skip = (checkpoint["epoch"], saved["batches_done"])
        rank_states = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
        if len(rank_states) != trainer.world_size:
            rank_zero_warn(
                f"ExactResume: the checkpoint holds RNG states of {len(rank_states)} rank(s), this run has "
                f"{trainer.world_size}; each rank starts a fresh stream (the data order is still resumed)."
            )
            return
        self._pending_rng = rank_states[trainer.global_rank]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Last hook before the first step, after DDP set-up, the sanity check and loader set-up used randomness.
        order = self._order
        fetcher = trainer.fit_loop._data_fetcher
        if (
            order is not None
            and fetcher is not None
            and order.drawn_epoch not in (None, trainer.current_epoch)
        ):
            # The train iterator was made before Lightning restored its loops (`estimated_stepping_batches` in
            # `configure_optimizers` sets the loader up early) and its workers already draw that epoch's order:
            # start it again for the epoch that trains now. Without workers, drawing waits for the first batch.
            iter(fetcher)
        if self._pending_rng is not None:
            restore_rng_states(self._pending_rng)
            self._pending_rng = None
        elif trainer.world_size > 1:
            rank_seed = self._base_seed() + trainer.global_rank
            random.seed(rank_seed)
            np.random.seed(rank_seed % 2**32)
            torch.manual_seed(rank_seed)  # also every CUDA device
