"""``make demo``: train the tiny forecasters on the shipped demo data, test them beside persistence, print the table;
then train and test a tiny SatDiFuser on the real BigEarthNet patches of ``data/geobench_demo`` and print its row.

Every model runs through the same CLI a user would call (``fit`` then ``test`` on the best checkpoint, or only
``test`` for a model without parameters); each test appends its row to one results CSV, printed at the end.
To add a model, add one ``DemoModel`` line to ``DEMO_MODELS`` with its tiny config.

The demo ends with one picture per model family, drawn by ``figures`` from the first test batch of the tested
models: ``forecast_panel.png`` (input | truth | every forecaster | their errors, with PSNR/SSIM/GSSIM per tile) and
``satdifuser_panel.png`` (the test patch with its true and predicted labels). The shipped data has two dates, so
there is no rollout to draw; a test run with ``--data.init_args.sequence true`` on data with more dates writes the
rollout figures (``rollouts/`` in the run folder).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

from figures import forecast_panel, geobench_panel, save_png
from lightning_cli.cli import main
from lightning_cli.resources import config_dir, demo_data_dir, resource_dir
from lightning_modules.forecast_task import sample_keys
from metrics.table import format_table, read_rows

CONFIG_DIR = config_dir()
DEMO_DATA = demo_data_dir()
DEMO_RUN_DIR = Path("runs") / "demo"
DIFUSER_DEMO_DATA = resource_dir("data") / "geobench_demo"  # written by tools/make_geobench_demo.py
DIFUSER_METRICS = ("test/f1_micro", "test/f1_macro", "test/loss")
PANEL_SAMPLES = 3
"""Test windows shown in the forecast panel."""


@dataclass(frozen=True)
class DemoModel:
    """A model of the demo: its tiny config (relative to ``configs/``), whether it needs training, and the
    shipped checkpoint (relative to ``data/``) it is tested from instead."""

    name: str
    config: str
    train: bool = True
    checkpoint: str | None = None


DEMO_MODELS = (
    DemoModel("persistence", "tiny/persistence.yaml", train=False),
    DemoModel("simvp", "tiny/simvp.yaml"),
    DemoModel("predrnn", "tiny/predrnn.yaml"),
    # trained by tools/train_demo_weights.py on the demo's training regions (data/weights/tiny_sd3/README.md)
    DemoModel(
        "sat-jepa-diff", "tiny/forecast.yaml", train=False, checkpoint="weights/tiny_sd3/forecast.ckpt"
    ),
)


def run_demo_model(model: DemoModel, run_dir: Path, results_csv: Path) -> LightningCLI:
    """Fit (when trainable) and test one model; its test row lands in ``results_csv``; returns the test run."""
    common = [
        "--config",
        str(CONFIG_DIR / model.config),
        "--data.init_args.root",
        str(DEMO_DATA),
        "--trainer.default_root_dir",
        str(run_dir / model.name),
        "--trainer.logger",
        "false",
        "--model.init_args.results_csv",
        str(results_csv),
    ]
    checkpoint = (
        [] if model.checkpoint is None else ["--ckpt_path", str(resource_dir("data") / model.checkpoint)]
    )
    if model.train:
        cli = main(["fit", *common])
        checkpoint = ["--ckpt_path", cli.trainer.checkpoint_callback.best_model_path]
    return main(["test", *common, *checkpoint])


def first_test_batch(cli: LightningCLI) -> dict:
    """The first batch of a tested run's test loader (its datamodule is already set up for test)."""
    return next(iter(cli.datamodule.test_dataloader()))


@torch.no_grad()
def test_forecast(cli: LightningCLI, batch: dict) -> torch.Tensor:
    """The tested model's forecast of ``batch``, exactly as its test scored it (clamped, per-sample seeds)."""
    model = cli.model.eval()
    return model.predict_next(batch["image"], sample_keys(batch))


def run_demo(models: tuple[DemoModel, ...] = DEMO_MODELS, run_dir: Path = DEMO_RUN_DIR) -> tuple[str, Path]:
    """Run every demo model from a fresh results CSV; return the side-by-side table and the forecast panel of the
    first test windows (every model's forecast of the same windows)."""
    results_csv = run_dir / "test_results.csv"
    results_csv.unlink(missing_ok=True)
    batch, forecasts = None, {}
    for model in models:
        started = time.perf_counter()
        cli = run_demo_model(model, run_dir, results_csv)
        batch = batch if batch is not None else first_test_batch(cli)
        forecasts[cli.model.model_name()] = test_forecast(cli, batch)
        print(f"demo: {model.name} done in {time.perf_counter() - started:.0f} s")
    picture = forecast_panel(
        batch["image"][:, -1], batch["target"], forecasts, batch["mask"], PANEL_SAMPLES,
        title=f"demo test windows of {batch['region'][0]}",
    )  # fmt: skip
    return format_table(read_rows(results_csv)), save_png(picture.figure, run_dir / "forecast_panel.png")


def run_difuser_demo(run_dir: Path = DEMO_RUN_DIR) -> tuple[str, Path]:
    """Fit and test the tiny SatDiFuser (random tiny UNet extractor, global fusion, linear head) on the six real
    BigEarthNet patches in GEO-Bench's m-bigearthnet format; returns its metric row and the picture of its test
    predictions."""
    started = time.perf_counter()
    common = [
        "--config", str(CONFIG_DIR / "tiny" / "difuser_cls.yaml"),
        "--data.init_args.task", "m-bigearthnet",
        "--data.init_args.root", str(DIFUSER_DEMO_DATA),
        "--trainer.default_root_dir", str(run_dir / "satdifuser"),
        "--trainer.logger", "false",
    ]  # fmt: skip
    fit = main(["fit", *common])
    test = main(["test", *common, "--ckpt_path", fit.trainer.checkpoint_callback.best_model_path])
    print(f"demo: satdifuser done in {time.perf_counter() - started:.0f} s")
    values = test.trainer.callback_metrics
    row = "SatDiFuser (tiny) | " + " | ".join(f"{name} {float(values[name]):.4f}" for name in DIFUSER_METRICS)
    batch, data = first_test_batch(test), test.datamodule
    with torch.no_grad():
        logits = test.model.eval()(batch)
    picture = geobench_panel(
        batch["image"], batch["label"], logits, data.class_names, data.task_type, data.ignore_index,
        title=f"SatDiFuser (tiny), {data.task} test",
    )  # fmt: skip
    return row, save_png(picture.figure, run_dir / "satdifuser_panel.png")


if __name__ == "__main__":
    table, forecast_figure = run_demo()
    difuser_row, difuser_figure = run_difuser_demo()
    print(f"\nTest metrics on {DEMO_DATA} (held-out test regions; results in {DEMO_RUN_DIR}):")
    print(table)
    print(
        f"\nSatDiFuser on {DIFUSER_DEMO_DATA} (6 real BigEarthNet patches, 43-label "
        "m-bigearthnet; trained on 4, tested on 1; a random tiny UNet, so the metrics only show the pipeline runs):"
    )
    print(difuser_row)
    print("\nFigures:")
    print(f"  forecasting (every model on the same test windows): {forecast_figure}")
    print(f"  SatDiFuser (test predictions): {difuser_figure}")
    print("  rollouts: the demo data has two dates; see the README's rollout section for data with more")
