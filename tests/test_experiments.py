"""lightning_cli.experiments: table files, the runner (skip, resume, missing) and the report cell by cell."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_cli import experiments
from lightning_cli.experiments import RESULTS_RECORD, TableError, load_table, run_table, write_report
from lightning_cli.resources import config_dir, demo_data_dir
from metrics.table import read_rows

TABLES = sorted((config_dir() / "tables").glob("*.yaml"))
FAST = [
    "--trainer.logger", "false", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
    "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar",
    "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip


def write_table(path: Path, **overrides) -> Path:
    spec = {
        "name": "tiny forecasting",
        "seeds": [0, 1],
        "datasets": {"demo": {"args": ["--data.init_args.root", str(demo_data_dir()), *FAST]}},
        "rows": [
            {"label": "Persistence", "configs": ["tiny/persistence.yaml"], "fit": False},
            {"label": "SimVP v2", "configs": ["tiny/simvp.yaml"]},
        ],
        "columns": [
            {"title": "L1", "metric": "test/l1", "better": "lower"},
            {"title": "SSIM", "metric": "test/ssim", "better": "higher"},
            {"title": "PSNR", "metric": "test/psnr", "better": "higher", "decimals": 2},
        ],
    }
    spec.update(overrides)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def arg(args, name):
    return args[args.index(name) + 1]


class FakeCLI:
    """Stands in for ``python -m lightning_cli``: records each command and writes the records a run would."""

    def __init__(self, metrics=None, interrupt_fits=0):
        self.calls: list[list[str]] = []
        self.metrics = metrics or (lambda folder: {"test/l1": 0.1, "test/ssim": 0.5, "test/psnr": 20.0})
        self.interrupt_fits = interrupt_fits

    def __call__(self, args) -> int:
        self.calls.append(list(args))
        folder = Path(arg(args, "--trainer.default_root_dir"))
        assert f"--trainer.callbacks+={experiments.RECORDER}" in args
        folder.mkdir(parents=True, exist_ok=True)
        if args[0] == "fit":
            (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
            (folder / "checkpoints" / "last.ckpt").write_text("weights")
            if self.interrupt_fits:  # pre-empted: last.ckpt but no fit.json, exit status 0
                self.interrupt_fits -= 1
                return 0
            (folder / "checkpoints" / "best.ckpt").write_text("weights")
            (folder / experiments.FIT_RECORD).write_text("{}")
        else:
            (folder / RESULTS_RECORD).write_text(json.dumps({"metrics": self.metrics(folder)}))
        return 0


# ------------------------------------------------------------------------------------------------ table files
@pytest.mark.parametrize("path", TABLES, ids=[path.stem for path in TABLES])
def test_shipped_tables_load(path):
    table = load_table(path)
    assert table.jobs() and table.columns
    for row in table.rows:  # every row of every shipped table runs: its configs exist
        assert not experiments.missing_configs(table, row), row.label


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"colour": "red"}, "'colour'"),
        ({"seeds": []}, "'seeds'"),
        ({"rows": [{"label": "A", "config": ["x.yaml"]}]}, "'rows[0].config'"),
        ({"columns": [{"title": "L1", "metric": "test/l1", "better": "less"}]}, "'columns[0].better'"),
        ({"columns": [{"title": "L1", "metric": "l1", "better": "lower"}]}, "'columns[0].metric'"),
        ({"datasets": {"demo": {"configs": ["tiny/nope.yaml"]}}}, "'datasets.demo.configs[0]'"),
        (
            {"columns": [{"title": "L1", "metric": "test/l1", "better": "lower", "dataset": "x"}]},
            "'columns[0].dataset'",
        ),
    ],
)
def test_bad_table_is_one_line_naming_file_and_key(tmp_path, capsys, change, key):
    path = write_table(tmp_path / "bad.yaml", **change)
    with pytest.raises(TableError) as error:
        load_table(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value) and key in str(error.value)
    assert experiments.main(["report", str(path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {error.value}"


def test_missing_row_config_refused_unless_skip_missing(tmp_path, capsys):
    rows = [
        {"label": "MCVD", "configs": ["tiny/mcvd_not_here.yaml"]},
        {"label": "SimVP", "configs": ["tiny/simvp.yaml"]},
    ]
    table = load_table(write_table(tmp_path / "t.yaml", rows=rows))
    cli = FakeCLI()
    with pytest.raises(TableError, match="--skip-missing"):
        run_table(table, tmp_path / "out", launch=cli)
    assert cli.calls == []
    assert "row 'MCVD' cannot run: 'rows[0].configs[0]'" in capsys.readouterr().err
    assert run_table(table, tmp_path / "out", skip_missing=True, launch=cli) == 0
    assert {arg(call, "--trainer.default_root_dir") for call in cli.calls} == {
        str(tmp_path / "out" / "simvp" / "demo" / f"seed_{seed}") for seed in (0, 1)
    }


# ------------------------------------------------------------------------------------------------ runner
def test_runner_skips_finished_jobs_and_resumes_interrupted_fit(tmp_path):
    table = load_table(write_table(tmp_path / "t.yaml"))
    out = tmp_path / "out"
    cli = FakeCLI(interrupt_fits=1)
    assert run_table(table, out, launch=cli) == 1  # persistence seeds 0, 1 tested; simvp seed 0 pre-empted
    assert [call[0] for call in cli.calls] == ["test", "test", "fit"]
    assert "--ckpt_path" not in cli.calls[2]
    cli.calls.clear()
    assert run_table(table, out, launch=cli) == 0
    resumed, tested = cli.calls[0], cli.calls[1]
    simvp0 = out / "simvp-v2" / "demo" / "seed_0"
    assert resumed[0] == "fit" and arg(resumed, "--ckpt_path") == str(simvp0 / "checkpoints" / "last.ckpt")
    assert tested[0] == "test" and arg(tested, "--ckpt_path") == str(simvp0 / "checkpoints" / "best.ckpt")
    assert arg(tested, "--seed_everything") == "0"
    assert [call[0] for call in cli.calls[2:]] == ["fit", "test"]  # seed 1, from scratch
    assert "--ckpt_path" not in cli.calls[2]
    cli.calls.clear()
    assert run_table(table, out, launch=cli) == 0 and cli.calls == []  # everything done: nothing runs
    assert run_table(table, out, job_index=3, launch=cli) == 0 and cli.calls == []
    shutil.rmtree(simvp0)
    assert run_table(table, out, job_index=2, launch=cli) == 0
    assert {arg(call, "--trainer.default_root_dir") for call in cli.calls} == {str(simvp0)}


def test_failed_job_is_reported_and_the_others_run(tmp_path, capsys):
    table = load_table(write_table(tmp_path / "t.yaml"))

    def launch(args):
        return 1 if "persistence" in arg(args, "--trainer.default_root_dir") else FakeCLI()(args)

    assert run_table(table, tmp_path / "out", launch=launch) == 1
    assert capsys.readouterr().err.count("failed: Persistence") == 2
    assert len(list((tmp_path / "out").glob(f"simvp-v2/demo/seed_*/{RESULTS_RECORD}"))) == 2


def test_commands_are_the_runners_plain_cli_lines(tmp_path, capsys):
    table_file = write_table(tmp_path / "t.yaml")
    assert (
        experiments.main(["commands", str(table_file), "--out", str(tmp_path / "o"), "--", "--x", "1"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("#")] == [
        f"# job {i}: {row} / demo / seed {seed}" for i, (row, seed) in enumerate(
            [("Persistence", 0), ("Persistence", 1), ("SimVP v2", 0), ("SimVP v2", 1)]
        )
    ]  # fmt: skip
    commands = [line for line in lines if not line.startswith("#")]
    assert [line.split()[3] for line in commands] == ["test", "test", "fit", "test", "fit", "test"]
    assert all(line.split()[1:3] == ["-m", "lightning_cli"] and "--x 1" in line for line in commands)


# ------------------------------------------------------------------------------------------------ report
def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as stream:
        return {record["model"]: record for record in csv.DictReader(stream)}


def markdown_cells(path: Path) -> dict[str, list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    return {
        cells[0]: cells[1:]
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])
    }


def check_report(table, out: Path, values: dict[str, dict[str, list[float]]]) -> None:
    """``values[row][metric]`` per seed -> the CSV's mean/std/n/best and the Markdown text of every cell."""
    write_report(table, out)
    records, cells = read_csv(out / f"{table.stem}.csv"), markdown_cells(out / f"{table.stem}.md")
    for index, column in enumerate(table.columns):
        means = {
            row: np.mean(v[column.metric]) * column.scale for row, v in values.items() if v.get(column.metric)
        }
        rounded = {row: round(mean, column.decimals) for row, mean in means.items()}
        pick = max if column.higher_is_better else min
        best = {row for row, mean in rounded.items() if mean == pick(rounded.values())}
        for row in (r.label for r in table.rows):
            record, text = records[row], cells[row][index]
            seeds = np.asarray(values.get(row, {}).get(column.metric, []), dtype=float) * column.scale
            assert int(record[f"{column.title} n"]) == len(seeds)
            assert record[f"{column.title} best"] == ("1" if row in best else "0")
            if not len(seeds):
                assert text == "–" and record[f"{column.title} mean"] == ""
                continue
            mean, std = seeds.mean(), seeds.std(ddof=1)
            assert float(record[f"{column.title} mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(record[f"{column.title} std"]) == pytest.approx(std, rel=1e-9)
            shown = f"{mean:.{column.decimals}f} ± {std:.{column.decimals}f}"
            assert text == (f"**{shown}**" if row in best else shown)


def test_report_cell_by_cell_with_best_marked_and_missing_rows(tmp_path):
    rows = [
        {"label": "A", "configs": ["tiny/simvp.yaml"]},
        {"label": "B", "configs": ["tiny/predrnn.yaml"]},
        {"label": "Not run", "configs": ["tiny/simvp.yaml"]},
    ]
    columns = [
        {"title": "L1", "metric": "test/l1", "better": "lower"},
        {"title": "Acc", "metric": "test/accuracy", "better": "higher", "scale": 100, "decimals": 1},
    ]
    table = load_table(write_table(tmp_path / "t.yaml", seeds=[3, 7, 11], rows=rows, columns=columns))
    rng = np.random.default_rng(0)
    values = {
        label: {"test/l1": list(rng.uniform(0, 1, 3)), "test/accuracy": list(rng.uniform(0, 1, 3))}
        for label in "AB"
    }
    for job in table.jobs():
        if job.row.label in values:
            metrics = {
                key: seeds[table.seeds.index(job.seed)] for key, seeds in values[job.row.label].items()
            }
            job.folder(tmp_path).mkdir(parents=True)
            (job.folder(tmp_path) / RESULTS_RECORD).write_text(json.dumps({"metrics": metrics}))
    check_report(table, tmp_path, values)
    assert sum(record["L1 best"] == "1" for record in read_csv(tmp_path / "t.csv").values()) == 1


def test_rollout_report_has_per_step_csv_and_plot(tmp_path):
    rollout = {"test_args": ["--data.init_args.sequence", "true"], "first_time": 2019}
    table = load_table(write_table(tmp_path / "r.yaml", rollout=rollout))
    for job in table.jobs():
        metrics = {f"test/step_{step}/{name}": step + job.seed + len(job.row.label) for step in (1, 2, 3)
                   for name in ("l1", "ssim", "psnr")}  # fmt: skip
        job.folder(tmp_path).mkdir(parents=True)
        (job.folder(tmp_path) / RESULTS_RECORD).write_text(json.dumps({"metrics": metrics}))
    written = write_report(table, tmp_path)
    assert tmp_path / "r_per_step.png" in written and (tmp_path / "r_per_step.png").stat().st_size > 0
    with (tmp_path / "r_per_step.csv").open(newline="") as stream:
        records = list(csv.DictReader(stream))
    simvp_l1 = [r for r in records if r["model"] == "SimVP v2" and r["metric"] == "L1"]
    assert [(r["step"], r["time"], float(r["mean"])) for r in simvp_l1] == [
        ("1", "2019", 9.5),
        ("2", "2020", 10.5),
        ("3", "2021", 11.5),
    ]
    # the table cell: each seed's mean over steps (10 and 11 for SimVP v2's two seeds), then over seeds
    assert float(read_csv(tmp_path / "r.csv")["SimVP v2"]["L1 mean"]) == pytest.approx(10.5)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_tiny_forecasting_table_end_to_end(tmp_path):
    """2 rows x 2 seeds through the real CLI (one training step); the report against each run's test CSV."""
    table = load_table(write_table(tmp_path / "t.yaml"))
    out = tmp_path / "out"
    assert run_table(table, out, launch=experiments.run_cli_in_process) == 0
    values: dict[str, dict[str, list[float]]] = {}
    for job in table.jobs():
        (model_row,) = read_rows(job.folder(out) / "test_results.csv").values()
        for column in table.columns:
            values.setdefault(job.row.label, {}).setdefault(column.metric, []).append(
                model_row[column.metric[5:]]
            )
    check_report(table, out, values)
    assert (out / "simvp-v2" / "demo" / "seed_1" / "checkpoints" / "best.ckpt").is_file()
    calls = []
    assert run_table(table, out, launch=calls.append) == 0 and calls == []


@pytest.mark.slow
def test_tiny_difuser_table_end_to_end(tmp_path):
    from datamodules.synthetic.geobench import write_benchmark

    root = write_benchmark(tmp_path / "geobench")
    table = load_table(config_dir() / "tables" / "satdifuser_tiny.yaml")
    extra = ["--data.init_args.root", str(root), *FAST]
    out = tmp_path / "out"
    assert run_table(table, out, extra, launch=experiments.run_cli_in_process) == 0
    values: dict[str, dict[str, list[float]]] = {}
    for job in table.jobs():
        metrics = json.loads((job.folder(out) / RESULTS_RECORD).read_text())["metrics"]
        for column in table.columns:
            if column.dataset == job.dataset.name:
                values.setdefault(job.row.label, {}).setdefault(column.metric, []).append(
                    metrics[column.metric]
                )
    check_report(table, out, values)


@pytest.mark.slow
def test_one_job_through_a_subprocess(tmp_path):
    """The default launcher: ``python -m lightning_cli`` in a child process, as a SLURM array task runs it."""
    table = load_table(write_table(tmp_path / "t.yaml", seeds=[5]))
    out = tmp_path / "out"
    assert run_table(table, out, job_index=1) == 0
    fit = json.loads((out / "simvp-v2" / "demo" / "seed_5" / experiments.FIT_RECORD).read_text())
    assert fit["best_model_path"].endswith("checkpoints/best.ckpt")
    metrics = json.loads((out / "simvp-v2" / "demo" / "seed_5" / RESULTS_RECORD).read_text())["metrics"]
    assert {"test/l1", "test/ssim", "test/psnr"} <= set(metrics)
