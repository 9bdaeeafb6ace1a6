"""LightningCLI for every satdiff model and datamodule.

Models and datamodules are chosen by ``class_path`` (short class names work because the packages
below are imported before parsing), every constructor argument is a config key, and unknown keys
are rejected by jsonargparse with the offending key named.

Each run writes everything (checkpoints, images, predictions, results CSV, resolved config, W&B files) into one
run folder, ``runs/<config name>/<YYYYmmdd-HHMMSS>`` unless ``trainer.default_root_dir`` names it explicitly.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

import callbacks  # noqa: F401  (registers short class names)
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401
import metrics  # noqa: F401
import networks  # noqa: F401
from callbacks import ExactResume, LastCheckpoint, NonFiniteLossGuard
from lightning_cli.resources import shipped_path

RUNS_ROOT = Path("runs")
RUN_DIR_ENV = "SATDIFF_RUN_DIR"  # the parent's run folder, read by the DDP processes Lightning launches
CHECKPOINT_FOLDER = "checkpoints"

# Callbacks every run gets. Each is a top-level config key (shown by --print_config, set to null to drop it);
# `trainer.enable_checkpointing false` drops the checkpoint ones.
DEFAULT_CALLBACKS: dict[str, tuple[type, dict[str, Any]]] = {
    "best_checkpoint": (
        ModelCheckpoint,
        {"monitor": "val/loss", "mode": "min", "filename": "best-{epoch}-{step}"},
    ),
    # last.ckpt every 500 steps, per epoch and on SIGTERM; a LastCheckpoint in trainer.callbacks replaces it.
    "last_checkpoint": (LastCheckpoint, {"every_n_train_steps": 500, "overridable": True}),
    "exact_resume": (ExactResume, {}),  # RNG states and mid-epoch data order on resume
    "nonfinite_guard": (NonFiniteLossGuard, {}),
}

# Keys set once under `data` and copied into the model before it is built: `data.init_args.<key>` -> each target
# that the chosen classes take (a target the model or network class lacks is skipped). A target set in the config to
# a value that is neither the source's nor the class default is an error naming both keys. Task fields a datamodule
# computes from its files (num_classes, class_names, task_type, dataset_key) are not linked here: the module reads
# them from `trainer.datamodule` in `configure_model` and refuses a disagreeing value set on the model.
DATA_TO_MODEL_LINKS: dict[str, tuple[str, ...]] = {
    "history": ("model.init_args.history", "model.init_args.network.init_args.in_frames"),
    "ignore_index": ("model.init_args.ignore_index",),
    "patch_size": ("model.init_args.encoder.init_args.img_size",),  # the I-JEPA encoder sees whole windows
}


class ConfigError(ValueError):
    """A config that cannot be built; its message names the key(s)."""


def trainer_defaults() -> dict:
    """Defaults a user gets without configuring anything: offline W&B (``offline: false`` goes online) and
    atomic checkpoint writes. ``default_root_dir`` stays unset so that each run gets its own folder."""
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"project": "satdiff", "offline": True},
        },
        "plugins": [{"class_path": "callbacks.AtomicCheckpointIO"}],
    }


def run_name(config: Namespace) -> str:
    """The run's folder name under ``runs/``: the first config's path below ``configs/`` without suffix
    (``tiny/simvp``), else its stem, else the model class name."""
    config_files = config.get("config") or []
    if config_files:
        path = Path(os.fspath(config_files[0])).resolve()
        parents = [parent.name for parent in path.parents]
        if "configs" in parents:
            return str(path.relative_to(path.parents[parents.index("configs")]).with_suffix(""))
        return path.stem
    class_path = (config.get("model") or Namespace()).get("class_path") or "run"
    return class_path.rsplit(".", 1)[-1].lower()


def newest_run_with_last_checkpoint(family: Path) -> Path | None:
    """The latest run folder of ``family`` holding ``checkpoints/last.ckpt`` (for ``--ckpt_path last``)."""
    runs = sorted(path.parent.parent for path in family.glob(f"*/{CHECKPOINT_FOLDER}/last.ckpt"))
    return runs[-1] if runs else None


def new_run_folder(family: Path) -> Path:
    """``family/<YYYYmmdd-HHMMSS>``, suffixed ``-2``, ``-3``... when a run of the same second exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, number = family / stamp, 1
    while folder.exists():
        number += 1
        folder = family / f"{stamp}-{number}"
    return folder


def resolve_run_folder(config: Namespace) -> Path:
    """The run folder: ``trainer.default_root_dir`` when set; else the parent process's (a launched DDP rank);
    else the run the checkpoint belongs to (``--ckpt_path last`` or ``<run>/checkpoints/x.ckpt``); else new."""
    explicit = config.trainer.get("default_root_dir")
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(RUN_DIR_ENV) and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(os.environ[RUN_DIR_ENV])
    family = RUNS_ROOT / run_name(config)
    ckpt_path = config.get("ckpt_path")
    if ckpt_path == "last":
        previous = newest_run_with_last_checkpoint(family)
        if previous is not None:
            return previous
    elif ckpt_path and Path(ckpt_path).parent.name == CHECKPOINT_FOLDER:
        run = Path(ckpt_path).parent.parent
        if any(run.glob("config*.yaml")):
            return run
    return new_run_folder(family)


class RunFolderConfigSaver(SaveConfigCallback):
    """Save the resolved config into the run folder (``trainer.default_root_dir``), whatever the logger."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folder = Path(trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(
            self.config,
            folder / self.config_filename,
            skip_unset=False,
            overwrite=True,
            multifile=self.multifile,
        )


def config_error_line(message: str) -> str:
    """One line naming the config key, out of a jsonargparse error message (which can span a Union dump)."""
    keys = re.findall(r'Parser key "([^"]+)"', message)  # outermost first, e.g. data, then batch_size
    nested = re.search(r"class_path '([^']+)'", message)
    key = ".init_args.".join(keys) if nested else (keys[0] if keys else None)
    items = [line.strip().lstrip("- ").strip() for line in message.splitlines()]
    option = re.search(r"Option '([^']+)' is not accepted", message)
    if option:
        owner = f" by {nested.group(1)}" if nested else ""
        name = f"{key}.init_args.{option.group(1)}" if key else option.group(1)
        return f"config key '{name}' is not accepted{owner}"
    for item in items:
        if "config key" in item:
            return item
    skipped = ("Expected a <class 'NoneType'>", "Given value", "Subtypes:", "Errors:", "Does not validate")
    details = [
        item
        for item in items
        if item and not item.startswith((*skipped, "Parser key", "Problem with given class_path"))
    ]
    if key and details:
        return f"config key '{key}': {details[0]}"
    return details[0] if details else message.strip()


class SatDiffArgumentParser(LightningArgumentParser):
    """jsonargparse's error output, ending with one line that names the config key."""

    def error(self, message: str, ex: Exception | None = None):
        summary = config_error_line(message)
        if summary != message.strip():
            message = f"{message}\n{summary}"
        super().error(message, ex)


def class_default(class_path: str, name: str) -> Any:
    """Default of constructor argument ``name`` of ``class_path`` (searched along the MRO for ``**kwargs``
    constructors); ``inspect.Parameter.empty`` when none is found."""
    module_name, _, class_name = class_path.rpartition(".")
    owner = getattr(importlib.import_module(module_name), class_name)
    for cls in getattr(owner, "__mro__", (owner,)):
        parameter = inspect.signature(cls).parameters.get(name) if "__init__" in vars(cls) else None
        if parameter is not None:
            return parameter.default
    return inspect.Parameter.empty


def apply_data_links(config: Namespace) -> None:
    """Copy each ``DATA_TO_MODEL_LINKS`` source into its targets, refusing a target set to another value."""
    data_args = config.get("data.init_args") if "data.init_args" in config else None
    if data_args is None:
        return
    for key, targets in DATA_TO_MODEL_LINKS.items():
        if key not in data_args:
            continue
        value = data_args[key]
        for target in targets:
            if target not in config:
                continue
            current = config[target]
            owner = target.rsplit(".init_args.", 1)[0]
            if current != value and current != class_default(
                config[f"{owner}.class_path"], target.split(".")[-1]
            ):
                raise ConfigError(
                    f"config key '{target}' ({current!r}) disagrees with 'data.init_args.{key}' ({value!r}): "
                    f"it is linked, set it once under data"
                )
            config[target] = value


def resolve_shipped_paths(value: Any) -> Any:
    """``value`` with every string that names a shipped file by a relative ``configs/...`` or ``data/...`` path
    missing from the current directory replaced by the shipped file's absolute path (see ``shipped_path``)."""
    if isinstance(value, Namespace):
        for key, item in vars(value).items():
            setattr(value, key, resolve_shipped_paths(item))
        return value
    if isinstance(value, dict):
        return {key: resolve_shipped_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve_shipped_paths(item) for item in value]
    if isinstance(value, str) and (shipped := shipped_path(value)) is not None:
        return str(shipped)
    return value


def with_shipped_configs(args: list[str]) -> list[str]:
    """Command-line arguments with each ``--config configs/...`` missing from the current directory pointing at
    the shipped config, so the README's commands also run outside the repository and from the wheel."""
    resolved = list(args)
    for index, arg in enumerate(resolved):
        if arg.startswith("--config="):
            shipped = shipped_path(arg.removeprefix("--config="))
            if shipped is not None:
                resolved[index] = f"--config={shipped}"
        elif index > 0 and resolved[index - 1] == "--config" and (shipped := shipped_path(arg)) is not None:
            resolved[index] = str(shipped)
    return resolved


def innermost_exception(error: BaseException) -> BaseException:
    """The exception at the root of a ``raise ... from`` chain (jsonargparse wraps constructor errors)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return error


def exit_with_config_error(error: BaseException) -> None:
    """Print the root cause's traceback (without jsonargparse's wrappers), then one line with its message."""
    cause = innermost_exception(error)
    if not isinstance(cause, ConfigError):
        traceback.print_exception(cause, chain=False, file=sys.stderr)
    message = " ".join(str(cause).split())
    sys.stderr.write(f"error: {type(cause).__name__}: {message}\n")
    raise SystemExit(2) from error


class SatDiffCLI(LightningCLI):
    """LightningCLI with satdiff's defaults: seed 0, one folder per run, data -> model key links, default
    callbacks as config keys, and one final error line naming the key when a config cannot be built."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        kwargs.setdefault("trainer_defaults", trainer_defaults())
        kwargs.setdefault("save_config_callback", RunFolderConfigSaver)
        kwargs.setdefault("parser_class", SatDiffArgumentParser)
        self.run_folder: Path | None = None
        self.created_run_folder = False
        if args is None:  # rewritten in place: LightningCLI warns when given args beside sys.argv's
            sys.argv[1:] = with_shipped_configs(sys.argv[1:])
        elif isinstance(args, list):
            args = with_shipped_configs(args)
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            args=args,
            run=run,
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        """Build the model from a checkpoint's saved config only when no config file is given.

        LightningCLI lets the checkpoint's hyperparameters override the parsed config, which would silently drop
        what the user sets for this run (``--model.init_args.predict_dir``, weight paths on another machine). With
        a ``--config``, that config and its overrides build the model; the checkpoint only supplies weights.
        """
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("config"):
            return
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key, (callback_class, init_args) in DEFAULT_CALLBACKS.items():
            parser.add_lightning_class_args(callback_class, key, subclass_mode=True, required=False)
            class_path = f"{callback_class.__module__}.{callback_class.__qualname__}"
            if callback_class.__module__.startswith("callbacks."):
                class_path = f"callbacks.{callback_class.__qualname__}"
            parser.set_defaults({key: {"class_path": class_path, "init_args": init_args}})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        resolve_shipped_paths(config)
        try:
            apply_data_links(config)
        except ConfigError as error:
            exit_with_config_error(error)
        self.run_folder = resolve_run_folder(config)
        config.trainer.default_root_dir = str(self.run_folder)
        os.environ[RUN_DIR_ENV] = str(self.run_folder)
        for logger in self._logger_configs(config.trainer.get("logger")):
            init_args = logger.get("init_args")
            if init_args is not None and "save_dir" in init_args and init_args.save_dir in (None, "."):
                init_args.save_dir = str(self.run_folder)  # W&B: <run>/wandb/offline-run-...
        if self.subcommand is not None:
            self.created_run_folder = not self.run_folder.exists()
            self.run_folder.mkdir(parents=True, exist_ok=True)  # taken: a run started the same second gets -2
            self.save_config_kwargs["config_filename"] = (
                "config.yaml" if self.subcommand == "fit" else f"config_{self.subcommand}.yaml"
            )
            self._announce("run folder")

    @staticmethod
    def _logger_configs(logger: Any) -> list[Namespace]:
        loggers = logger if isinstance(logger, list) else [logger]
        return [item for item in loggers if isinstance(item, Namespace)]

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:  # a constructor rejected a config value
            if self.created_run_folder and not any(self.run_folder.iterdir()):
                self.run_folder.rmdir()  # leave no empty run behind
            exit_with_config_error(error)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        extra_callbacks = [
            callback
            for key in self._parser(self.subcommand).callback_keys
            if (callback := self._get(self.config_init, key)) is not None
        ]
        if trainer_config.get("enable_checkpointing") is False:
            extra_callbacks = [cb for cb in extra_callbacks if not isinstance(cb, ModelCheckpoint)]
        trainer = self._instantiate_trainer(trainer_config, extra_callbacks)
        for callback in trainer.checkpoint_callbacks:
            if callback.dirpath is None:  # not <logger save_dir>/<name>/<version>: the run folder
                callback.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, CHECKPOINT_FOLDER))
        return trainer

    @rank_zero_only
    def _announce(self, what: str) -> None:
        print(f"{what}: {self.run_folder}", flush=True)

    def after_fit(self) -> None:
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()  # else the next run of this process would log into this W&B run
        self._announce("run folder (done)")

    after_validate = after_test = after_predict = after_fit


def main(args: list[str] | None = None, run: bool = True) -> SatDiffCLI:
    """Run the CLI; tests call ``main([...])`` with an argument list."""
    return SatDiffCLI(args=args, run=run)


def console_main() -> None:
    """The ``satdiff`` console script: ``satdiff fit --config ...`` is ``python -m lightning_cli fit ...``."""
    main()
