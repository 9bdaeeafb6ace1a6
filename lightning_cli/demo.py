"""``make demo``: train the tiny forecasters on the shipped demo data, test them beside persistence, print the table;
then train and test a tiny SatDiFuser on the real BigEarthNet patches of ``data/geobench_demo`` and print its row.

Every model runs through the same CLI a user would call (``fit`` then ``test`` on the best checkpoint, or only
``test`` for a model without parameters); each test appends its row to one results CSV, printed at the end.
To add a model, add one ``DemoModel`` line to ``DEMO_MODELS`` with its tiny config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lightning_cli.cli import main
from lightning_cli.resources import config_dir, demo_data_dir, resource_dir
from metrics.table import format_table, read_rows

CONFIG_DIR = config_dir()
DEMO_DATA = demo_data_dir()
DEMO_RUN_DIR = Path("runs") / "demo"
DIFUSER_DEMO_DATA = resource_dir("data") / "geobench_demo"  # written by tools/make_geobench_demo.py
DIFUSER_METRICS = ("test/f1_micro", "test/f1_macro", "test/loss")


@dataclass(frozen=True)
class DemoModel:
    """A model of the demo: its tiny config (relative to ``configs/``) and whether it needs training."""

    name: str
    config: str
    train: bool = True


DEMO_MODELS = (
    DemoModel("persistence", "tiny/persistence.yaml", train=False),
    DemoModel("simvp", "tiny/simvp.yaml"),
    DemoModel("predrnn", "tiny/predrnn.yaml"),
    DemoModel("sat-jepa-diff", "tiny/forecast.yaml"),
)


def run_demo_model(model: DemoModel, run_dir: Path, results_csv: Path) -> None:
    """Fit (when trainable) and test one model; its test row lands in ``results_csv``."""
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
    checkpoint = []
    if model.train:
        cli = main(["fit", *common])
        checkpoint = ["--ckpt_path", cli.trainer.checkpoint_callback.best_model_path]
    main(["test", *common, *checkpoint])


def run_demo(models: tuple[DemoModel, ...] = DEMO_MODELS, run_dir: Path = DEMO_RUN_DIR) -> str:
    """Run every demo model from a fresh results CSV and return the side-by-side table."""
    results_csv = run_dir / "test_results.csv"
    results_csv.unlink(missing_ok=True)
    for model in models:
        started = time.perf_counter()
        run_demo_model(model, run_dir, results_csv)
        print(f"demo: {model.name} done in {time.perf_counter() - started:.0f} s")
    return format_table(read_rows(results_csv))


def run_difuser_demo(run_dir: Path = DEMO_RUN_DIR) -> str:
    """Fit and test the tiny SatDiFuser (random tiny UNet extractor, global fusion, linear head) on the six real
    BigEarthNet patches in GEO-Bench's m-bigearthnet format; returns its metric row."""
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
    return "SatDiFuser (tiny) | " + " | ".join(
        f"{name} {float(values[name]):.4f}" for name in DIFUSER_METRICS
    )


if __name__ == "__main__":
    table = run_demo()
    print(f"\nTest metrics on {DEMO_DATA} (held-out test regions; results in {DEMO_RUN_DIR}):")
    print(table)
    difuser_row = run_difuser_demo()
    print(
        f"\nSatDiFuser on {DIFUSER_DEMO_DATA} (6 real BigEarthNet patches, 43-label "
        "m-bigearthnet; trained on 4, tested on 1; a random tiny UNet, so the metrics only show the pipeline runs):"
    )
    print(difuser_row)
