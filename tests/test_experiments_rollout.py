"""The tiny Appendix C rollout table end to end: generated yearly data, real CLI runs, report cell by cell."""

from __future__ import annotations

import csv
import statistics

import pytest

from datamodules.synthetic.s2 import make_s2_dataset
from lightning_cli import experiments
from lightning_cli.experiments import load_table, run_table
from lightning_cli.resources import config_dir
from metrics.table import read_rows
from tests.test_experiments import check_report

FAST = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip
MODEL_NAMES = {"Default (persistence x_t)": "Persistence", "SimVP v2": "SimVP"}


def step_rows(test_csv) -> dict[int, dict[str, float]]:
    """``{step: metrics}`` of one rollout run's ``test_results.csv`` (rows ``<model> step <n>``)."""
    rows = {}
    for name, metrics in read_rows(test_csv).items():
        model, _, step = name.rpartition(" step ")
        assert model in MODEL_NAMES.values(), name
        rows[int(step)] = metrics
    return dict(sorted(rows.items()))


def test_tiny_appendix_c_rollout_table_end_to_end(tmp_path):
    root = make_s2_dataset(tmp_path / "s2_years", height=64, width=64)  # 5 regions, 2019-2021
    table = load_table(config_dir() / "tables" / "satjepadiff_appendix_c_tiny.yaml")
    assert table.rollout is not None and [row.label for row in table.rows] == list(MODEL_NAMES)
    out = tmp_path / "out"
    extra = ["--data.init_args.root", str(root), *FAST]
    assert run_table(table, out, extra, launch=experiments.run_cli_in_process) == 0

    per_seed: dict[str, dict[str, list[float]]] = {}  # the table cells' inputs: each seed's mean over steps
    per_step: dict[tuple[str, str, int], list[float]] = {}
    for job in table.jobs():
        steps = step_rows(job.folder(out) / "test_results.csv")
        assert list(steps) == [1, 2]  # 2019 -> 2020 -> 2021: two forecast steps
        for column in table.columns:
            name = column.metric.removeprefix("test/")
            values = [metrics[name] for metrics in steps.values()]
            per_seed.setdefault(job.row.label, {}).setdefault(column.metric, []).append(
                statistics.fmean(values)
            )
            for step, value in zip(steps, values, strict=True):
                per_step.setdefault((job.row.label, column.title, step), []).append(value)
    check_report(table, out, per_seed)

    with (out / f"{table.stem}_per_step.csv").open(newline="") as stream:
        records = list(csv.DictReader(stream))
    assert len(records) == len(per_step)
    for record in records:
        seeds = per_step[(record["model"], record["metric"], int(record["step"]))]
        assert int(record["time"]) == table.rollout.first_time + int(record["step"]) - 1
        assert int(record["n"]) == len(seeds) == len(table.seeds)
        assert float(record["mean"]) == pytest.approx(statistics.fmean(seeds), rel=1e-9)
        assert float(record["std"]) == pytest.approx(statistics.stdev(seeds), rel=1e-9, abs=1e-12)
    assert (out / f"{table.stem}_per_step.png").stat().st_size > 0
