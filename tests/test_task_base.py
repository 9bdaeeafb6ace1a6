"""The shared task skeleton (lightning_modules/base.py): checkpoints that load alone, one LR schedule, no warnings."""

from __future__ import annotations

import math
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from datamodules.synthetic.geobench import write_eurosat
from lightning_cli import main
from lightning_modules import BaselineForecastModule, DiFuserModule, ForecastModule
from lightning_modules.base import BaseTask
from networks.baselines import Persistence
from networks.difuser import GlobalWeightedFusion, LinearClassificationHead
from tests.test_difuser_extractor import tiny_extractor

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = REPO_ROOT / "configs" / "tiny"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1"]


def fit_tiny(config: str, run: Path, *extra: str):
    """``fit`` of a tiny config through the CLI for two optimizer steps; returns the CLI and ``last.ckpt``."""
    cli = main(
        ["fit", "--config", str(TINY / config), *QUIET, "--trainer.default_root_dir", str(run), *extra]
    )
    return cli, run / "checkpoints" / "last.ckpt"


def forecast_batch(size: int = 64) -> torch.Tensor:
    return torch.rand(2, 1, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("config", "module_class"),
    [
        ("simvp.yaml", BaselineForecastModule),
        ("forecast.yaml", ForecastModule),
    ],
)
def test_forecaster_checkpoint_loads_without_its_networks(tmp_path, monkeypatch, config, module_class):
    monkeypatch.chdir(REPO_ROOT)  # the tiny forecast config names its tokenizer relative to the repository
    data = f"--data.init_args.root={REPO_ROOT / 'data' / 'demo'}"
    limits = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    with warnings.catch_warnings():  # the EMA target encoder stays in eval mode on purpose
        warnings.filterwarnings("error", message=".*in eval mode at the start of training")
        cli, checkpoint = fit_tiny(config, tmp_path, data, *limits)
    reloaded = module_class.load_from_checkpoint(checkpoint)
    trained = cli.model.eval()
    reloaded.eval()
    image = forecast_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.forecast(image), trained.forecast(image), rtol=0, atol=0)


def test_difuser_checkpoint_loads_without_its_networks(tmp_path):
    root = tmp_path / "geobench"
    write_eurosat(root)
    cli, checkpoint = fit_tiny(
        "difuser_cls.yaml",
        tmp_path / "run",
        "--data.init_args.root",
        str(root),
        "--trainer.limit_train_batches",
        "2",
    )
    reloaded = DiFuserModule.load_from_checkpoint(checkpoint)
    assert reloaded.task == cli.model.task  # from the checkpoint, not from the hyperparameters
    assert not {"num_classes", "task_type", "ignore_index"} & set(reloaded.hparams)
    batch = next(iter(cli.datamodule.val_dataloader()))
    trained = cli.model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch), trained(batch), rtol=0, atol=0)


def test_modules_built_directly_keep_only_plain_hyperparameters():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is an instance of `nn.Module`")
        baseline = BaselineForecastModule(
            Persistence(), history=2, optimizer=partial(torch.optim.SGD, lr=0.1)
        )
        difuser = DiFuserModule(
            tiny_extractor(timesteps=[1], num_inversion_steps=2),
            fusion=partial(GlobalWeightedFusion, out_channels=8, bottleneck_channels=8),
            head=LinearClassificationHead,
        )
    assert baseline.hparams["history"] == 2 and not {"network", "optimizer"} & set(baseline.hparams)
    assert not {"extractor", "fusion", "head", "optimizer"} & set(difuser.hparams)


# ----- the shared warm-up-then-cosine schedule ---------------------------------------------------------------
class LinearTask(BaseTask):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).square().mean()


class RecordLearningRate(Callback):
    def __init__(self):
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_warmup_then_cosine_counts_optimizer_steps(tmp_path):
    """4 batches, 2 accumulated: 2 optimizer steps per epoch, 6 in 3 epochs; warm-up 1.5 epochs = 3 steps."""
    task = LinearTask(
        optimizer=partial(torch.optim.SGD, lr=0.1), warmup_epochs=1.5, warmup_start_lr=0.01, min_lr=0.001
    )
    record = RecordLearningRate()
    trainer = Trainer(
        max_epochs=3, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[record], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(task, torch.utils.data.DataLoader(torch.rand(8, 2), batch_size=2))
    per_step = record.rates[::2]  # the rate seen by each optimizer step's first micro-batch
    cosine = [0.001 + (0.1 - 0.001) * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]
    assert per_step == pytest.approx([0.01, 0.04, 0.07, *cosine])
    assert trainer.lr_scheduler_configs[0].interval == "step"


def test_scheduler_and_warmup_are_exclusive():
    with pytest.raises(ValueError, match="warmup_epochs to null"):
        LinearTask(scheduler=torch.optim.lr_scheduler.ConstantLR, warmup_epochs=1)


# ----- no project warnings -----------------------------------------------------------------------------------
def loader(batches: list[dict]) -> torch.utils.data.DataLoader:
    """Ready-made batches, yielded as they are."""
    return torch.utils.data.DataLoader(batches, batch_size=None)


def forecast_batches(count: int = 2) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        image = torch.rand(2, 1, 3, 48, 48, generator=generator)
        batches.append(
            {"image": image, "target": image[:, -1], "mask": torch.ones(2, 48, 48, dtype=torch.bool)}
        )
    return batches


def quiet_trainer(tmp_path, **kwargs) -> Trainer:
    return Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, **kwargs,
    )  # fmt: skip


def test_persistence_fits_without_optimizer_warnings(tmp_path):
    module = BaselineForecastModule(Persistence())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*configure_optimizers` returned `None`")
        warnings.filterwarnings("error", message=".*training_step` returned `None`")
        quiet_trainer(tmp_path, max_epochs=1).fit(
            module, loader(forecast_batches()), loader(forecast_batches(1))
        )
    assert not module.automatic_optimization


def difuser_module() -> DiFuserModule:
    return DiFuserModule(
        tiny_extractor(timesteps=[1], num_inversion_steps=2),
        fusion=partial(GlobalWeightedFusion, out_channels=8, bottleneck_channels=8),
        head=LinearClassificationHead,
        num_classes=3,
        task_type="classification",
    )


def classification_batches(count: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.rand(2, 3, 32, 32, generator=generator),
            "label": torch.tensor([0, 2]),
            "sample": ["a", "b"],
        }
        for _ in range(count)
    ]


@pytest.mark.parametrize("head_in_eval_mode", [False, True])
def test_frozen_extractor_in_eval_mode_warns_only_with_other_eval_modules(tmp_path, head_in_eval_mode):
    module = difuser_module()
    if head_in_eval_mode:
        module.head.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(
            module, loader(classification_batches())
        )
        silenced = [f for f in warnings.filters if f[1] is not None and "eval mode" in f[1].pattern]
    eval_warnings = [
        str(w.message) for w in caught if "in eval mode at the start of training" in str(w.message)
    ]
    assert len(eval_warnings) == int(head_in_eval_mode)
    assert not silenced  # the filter ends when training starts
