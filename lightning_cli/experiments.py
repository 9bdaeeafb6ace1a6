"""One command per paper table: run every row of a table file through the ordinary CLI, then tabulate it.

    python -m lightning_cli.experiments run      TABLE --out DIR [--skip-missing] [--job I] [-- CLI ARGS...]
    python -m lightning_cli.experiments report   TABLE --out DIR
    python -m lightning_cli.experiments commands TABLE --out DIR [-- CLI ARGS...]

``TABLE`` is a table file (``configs/tables/<name>.yaml`` or its bare name). It lists rows (config overlays),
the datasets the columns are measured on, seeds and the columns in the paper's layout. Every (row, dataset,
seed) is one *job*: a plain ``python -m lightning_cli fit`` then ``test`` in its own run folder
``DIR/<row>/<dataset>/seed_<s>`` (``trainer.default_root_dir``); jobs run in turn. ``--job I`` runs job I only
(a SLURM array task), and ``commands`` prints every job's two commands. Arguments after ``--`` go to every
command (data roots, weight paths).

A job's record is two files the :class:`RunRecorder` callback writes atomically into its run folder:
``fit.json`` when ``fit`` has finished (a pre-empted fit never gets there) and ``results.json`` with every
``test/`` metric the module logged, whatever the family. A job with ``results.json`` is skipped; one with a
``last.ckpt`` but no ``fit.json`` resumes from it. ``report`` reads only ``results.json`` files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import shlex
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from fileio import atomic_open
from lightning_cli.resources import config_dir

FIT_RECORD = "fit.json"
RESULTS_RECORD = "results.json"
BEST_CHECKPOINT = "best"  # the monitored checkpoint's file name: <run>/checkpoints/best.ckpt
RECORDER = "lightning_cli.experiments.RunRecorder"
TEST_PREFIX = "test/"

TABLE_KEYS = {"name", "reference", "seeds", "datasets", "rows", "columns", "rollout"}
REQUIRED_TABLE_KEYS = ("name", "seeds", "datasets", "rows", "columns")
DATASET_KEYS = {"configs", "args"}
ROW_KEYS = {"label", "configs", "args", "fit"}
COLUMN_KEYS = {"title", "metric", "better", "dataset", "scale", "decimals"}
ROLLOUT_KEYS = {"test_args", "first_time", "time_step"}
BETTER = {"higher": True, "lower": False}


class TableError(ValueError):
    """A table file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Dataset:
    name: str
    configs: tuple[str, ...]
    args: tuple[str, ...]


@dataclass(frozen=True)
class Row:
    label: str
    slug: str
    configs: tuple[str, ...]
    args: tuple[str, ...]
    fit: bool


@dataclass(frozen=True)
class Column:
    title: str
    metric: str
    higher_is_better: bool
    dataset: str
    scale: float
    decimals: int


@dataclass(frozen=True)
class Rollout:
    """Rollout tables test with ``test_args`` (sequence mode); step ``n`` is at time
    ``first_time + (n - 1) * time_step``."""

    test_args: tuple[str, ...]
    first_time: int
    time_step: int


@dataclass(frozen=True)
class Job:
    index: int
    row: Row
    dataset: Dataset
    seed: int

    @property
    def name(self) -> str:
        return f"{self.row.label} / {self.dataset.name} / seed {self.seed}"

    def folder(self, out: Path) -> Path:
        return out / self.row.slug / self.dataset.name / f"seed_{self.seed}"


@dataclass(frozen=True)
class Table:
    path: Path
    name: str
    reference: str
    seeds: tuple[int, ...]
    datasets: dict[str, Dataset]
    rows: tuple[Row, ...]
    columns: tuple[Column, ...]
    rollout: Rollout | None

    @property
    def stem(self) -> str:
        return self.path.stem

    def jobs(self) -> list[Job]:
        """Every (row, dataset a column uses, seed), rows first: the order of ``run`` and of ``--job``."""
        used = [name for name in self.datasets if any(column.dataset == name for column in self.columns)]
        combos = [
            (row, self.datasets[name], seed) for row in self.rows for name in used for seed in self.seeds
        ]
        return [Job(index, *combo) for index, combo in enumerate(combos)]


# ------------------------------------------------------------------------------------------------ table files
def resolve_config(path: str) -> Path:
    """A table's config path: absolute, or relative to the shipped ``configs/`` folder."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() else config_dir() / candidate


def table_path(table: str | Path) -> Path:
    """A table file path, or the bare name of a shipped one (``satdifuser_table1`` -> configs/tables/...)."""
    path = Path(table)
    if path.suffix in (".yaml", ".yml"):
        return path
    return config_dir() / "tables" / f"{path}.yaml"


def slugify(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "row"


class _Reader:
    """Typed access to a table file's keys; every problem is one line naming the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> TableError:
        return TableError(f"{self.path}: '{key}': {problem}")

    def mapping(self, value: Any, key: str, allowed: set[str], required: Sequence[str] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, got {type(value).__name__}")
        for name in value:
            if name not in allowed:
                raise self.fail(f"{key}.{name}" if key else name, f"unknown key; allowed: {sorted(allowed)}")
        for name in required:
            if name not in value:
                raise self.fail(f"{key}.{name}" if key else name, "is required")
        return value

    def strings(self, value: Any, key: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(item, str | int | float) for item in value):
            raise self.fail(key, "must be a list of strings")
        return tuple(str(item) for item in value)

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "must be a non-empty string")
        return value

    def integer(self, value: Any, key: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, f"must be an integer, got {value!r}")
        return value


def load_table(table: str | Path) -> Table:
    """Read and check a table file. Row configs may be missing (systems still to come; ``run`` reports them);
    a dataset config must exist."""
    path = table_path(table)
    if not path.is_file():
        raise TableError(f"{path}: table file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TableError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from error
    reader = _Reader(path)
    raw = reader.mapping(raw, "", TABLE_KEYS, REQUIRED_TABLE_KEYS)

    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise reader.fail("seeds", "must be a non-empty list of integers")
    seeds = tuple(reader.integer(seed, f"seeds[{i}]") for i, seed in enumerate(seeds))
    if len(set(seeds)) != len(seeds):
        raise reader.fail("seeds", f"repeats a seed: {list(seeds)}")

    datasets = {}
    raw_datasets = reader.mapping(raw["datasets"], "datasets", set(raw["datasets"] or {}))
    if not raw_datasets:
        raise reader.fail("datasets", "must name at least one dataset")
    for name, spec in raw_datasets.items():
        if not re.fullmatch(r"[A-Za-z0-9._-]+", str(name)):
            raise reader.fail(f"datasets.{name}", "a dataset name is a folder name: letters, digits, . _ -")
        spec = reader.mapping(spec or {}, f"datasets.{name}", DATASET_KEYS)
        configs = reader.strings(spec.get("configs"), f"datasets.{name}.configs")
        for i, config in enumerate(configs):
            if not resolve_config(config).is_file():
                raise reader.fail(
                    f"datasets.{name}.configs[{i}]", f"config file {resolve_config(config)} not found"
                )
        datasets[str(name)] = Dataset(
            str(name), configs, reader.strings(spec.get("args"), f"datasets.{name}.args")
        )

    if not isinstance(raw["rows"], list) or not raw["rows"]:
        raise reader.fail("rows", "must be a non-empty list")
    rows = []
    for i, spec in enumerate(raw["rows"]):
        key = f"rows[{i}]"
        spec = reader.mapping(spec, key, ROW_KEYS, ("label",))
        label = reader.text(spec["label"], f"{key}.label")
        fit = spec.get("fit", True)
        if not isinstance(fit, bool):
            raise reader.fail(f"{key}.fit", f"must be true or false, got {fit!r}")
        row = Row(
            label,
            slugify(label),
            reader.strings(spec.get("configs"), f"{key}.configs"),
            reader.strings(spec.get("args"), f"{key}.args"),
            fit,
        )
        if any(other.slug == row.slug for other in rows):
            raise reader.fail(
                f"{key}.label", f"'{label}' gives the same run folder as another row ({row.slug})"
            )
        rows.append(row)

    if not isinstance(raw["columns"], list) or not raw["columns"]:
        raise reader.fail("columns", "must be a non-empty list")
    columns = []
    for i, spec in enumerate(raw["columns"]):
        key = f"columns[{i}]"
        spec = reader.mapping(spec, key, COLUMN_KEYS, ("title", "metric", "better"))
        if spec["better"] not in BETTER:
            raise reader.fail(f"{key}.better", f"must be 'higher' or 'lower', got {spec['better']!r}")
        dataset = spec.get("dataset")
        if dataset is None:
            if len(datasets) > 1:
                raise reader.fail(f"{key}.dataset", f"is required with several datasets {sorted(datasets)}")
            dataset = next(iter(datasets))
        if dataset not in datasets:
            raise reader.fail(f"{key}.dataset", f"'{dataset}' is not one of the datasets {sorted(datasets)}")
        metric = reader.text(spec["metric"], f"{key}.metric")
        if not metric.startswith(TEST_PREFIX):
            raise reader.fail(
                f"{key}.metric", f"must be a logged test metric ('{TEST_PREFIX}...'), got '{metric}'"
            )
        scale = spec.get("scale", 1)
        if not isinstance(scale, int | float) or isinstance(scale, bool):
            raise reader.fail(f"{key}.scale", f"must be a number, got {scale!r}")
        columns.append(
            Column(
                reader.text(spec["title"], f"{key}.title"),
                metric,
                BETTER[spec["better"]],
                dataset,
                float(scale),
                reader.integer(spec.get("decimals", 4), f"{key}.decimals"),
            )
        )

    rollout = None
    if raw.get("rollout") is not None:
        spec = reader.mapping(raw["rollout"], "rollout", ROLLOUT_KEYS, ("test_args", "first_time"))
        rollout = Rollout(
            reader.strings(spec["test_args"], "rollout.test_args"),
            reader.integer(spec["first_time"], "rollout.first_time"),
            reader.integer(spec.get("time_step", 1), "rollout.time_step"),
        )
    return Table(
        path,
        reader.text(raw["name"], "name"),
        str(raw.get("reference", "")),
        seeds,
        datasets,
        tuple(rows),
        tuple(columns),
        rollout,
    )


def missing_configs(table: Table, row: Row) -> list[str]:
    """One line per config file of ``row`` that does not exist (a system not built yet)."""
    index = table.rows.index(row)
    return [
        f"{table.path}: row '{row.label}' cannot run: "
        f"'rows[{index}].configs[{i}]' {resolve_config(config)} not found"
        for i, config in enumerate(row.configs)
        if not resolve_config(config).is_file()
    ]


# ------------------------------------------------------------------------------------------------ run records
def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    with atomic_open(path, "w") as stream:
        json.dump(payload, stream, indent=2, sort_keys=True)


class RunRecorder(Callback):
    """Record a finished ``fit`` (``fit.json``) and a finished ``test``'s metrics (``results.json``, every
    logged ``test/`` scalar) in the run folder, atomically. ``on_fit_end`` is not reached by a pre-empted or
    failed fit, so ``fit.json`` marks a complete one; they tell the runner which jobs are done."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            write_json(
                Path(trainer.default_root_dir) / FIT_RECORD,
                {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "best_model_path": best},
            )

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith(TEST_PREFIX) and getattr(value, "numel", lambda: 1)() == 1
        }
        if not metrics:
            raise RuntimeError(
                f"{type(pl_module).__name__} logged no '{TEST_PREFIX}' metric: nothing to record"
            )
        if trainer.is_global_zero:
            write_json(
                Path(trainer.default_root_dir) / RESULTS_RECORD,
                {"metrics": metrics, "checkpoint": trainer.ckpt_path},
            )


def read_results(folder: Path) -> dict[str, float] | None:
    path = folder / RESULTS_RECORD
    if not path.is_file():
        return None
    return {key: float(value) for key, value in json.loads(path.read_text())["metrics"].items()}


# ------------------------------------------------------------------------------------------------ commands
def common_args(job: Job, out: Path, extra: Sequence[str]) -> list[str]:
    """The job's configs and arguments: dataset configs, row configs, dataset args, row args, the caller's
    extra args; then the pinned seed, run folder, best-checkpoint name and the recorder."""
    args: list[str] = []
    for config in (*job.dataset.configs, *job.row.configs):
        args += ["--config", str(resolve_config(config))]
    return [
        *args,
        *job.dataset.args,
        *job.row.args,
        *extra,
        "--seed_everything", str(job.seed),
        "--trainer.default_root_dir", str(job.folder(out)),
        "--best_checkpoint.init_args.filename", BEST_CHECKPOINT,
        "--best_checkpoint.init_args.enable_version_counter", "false",
        f"--trainer.callbacks+={RECORDER}",
    ]  # fmt: skip


def checkpoint_path(folder: Path, name: str) -> Path:
    return folder / "checkpoints" / f"{name}.ckpt"


def fit_command(job: Job, out: Path, extra: Sequence[str], resume: bool = False) -> list[str]:
    resume_args = ["--ckpt_path", str(checkpoint_path(job.folder(out), "last"))] if resume else []
    return ["fit", *common_args(job, out, extra), *resume_args]


def test_checkpoint(folder: Path) -> Path:
    """The best ``val/loss`` checkpoint; ``last.ckpt`` when the run had no validation to pick one by."""
    best = checkpoint_path(folder, BEST_CHECKPOINT)
    return (
        best
        if best.is_file() or not checkpoint_path(folder, "last").is_file()
        else checkpoint_path(folder, "last")
    )


def test_command(table: Table, job: Job, out: Path, extra: Sequence[str]) -> list[str]:
    rollout_args = list(table.rollout.test_args) if table.rollout else []
    checkpoint = ["--ckpt_path", str(test_checkpoint(job.folder(out)))] if job.row.fit else []
    return ["test", *common_args(job, out, extra), *rollout_args, *checkpoint]


def shell_line(args: Sequence[str]) -> str:
    return shlex.join([Path(sys.executable).name, "-m", "lightning_cli", *args])


def run_cli_subprocess(args: Sequence[str]) -> int:
    """``python -m lightning_cli ARGS`` in a child process; a SIGTERM to this process is passed on to it (its
    ``last.ckpt`` is written) instead of orphaning it."""
    child = subprocess.Popen([sys.executable, "-m", "lightning_cli", *args])
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli_in_process(args: Sequence[str]) -> int:
    """``lightning_cli.cli.main(ARGS)`` in this process: the same run without a new interpreter's start-up."""
    from lightning_cli.cli import main

    try:
        main(list(args))
    except SystemExit as error:
        return error.code if isinstance(error.code, int) else int(error.code is not None)
    return 0


class JobFailed(RuntimeError):
    """A job's fit or test did not finish; the other jobs still run."""


class JobInterrupted(RuntimeError):
    """A fit stopped before its end (pre-emption): the whole run stops, the next one resumes it."""


def run_job(
    table: Table, job: Job, out: Path, extra: Sequence[str], launch: Callable[[Sequence[str]], int]
) -> str:
    """Fit (or resume) and test one job unless its results exist; returns what was done."""
    folder = job.folder(out)
    if (folder / RESULTS_RECORD).is_file():
        return "done before, skipped"
    if job.row.fit and not (folder / FIT_RECORD).is_file():
        resume = checkpoint_path(folder, "last").is_file()
        if resume:
            print(
                f"[job {job.index}] {job.name}: resuming from {checkpoint_path(folder, 'last')}", flush=True
            )
        status = launch(fit_command(job, out, extra, resume=resume))
        if status != 0:
            raise JobFailed(f"{job.name}: fit exited with status {status} (run folder {folder})")
        if not (folder / FIT_RECORD).is_file():
            raise JobInterrupted(
                f"{job.name}: fit stopped before its end; run again to resume from last.ckpt"
            )
    status = launch(test_command(table, job, out, extra))
    if status != 0 or not (folder / RESULTS_RECORD).is_file():
        raise JobFailed(f"{job.name}: test exited with status {status} without {folder / RESULTS_RECORD}")
    return "finished"


def run_table(
    table: Table,
    out: Path,
    extra: Sequence[str] = (),
    skip_missing: bool = False,
    job_index: int | None = None,
    launch: Callable[[Sequence[str]], int] = run_cli_subprocess,
) -> int:
    """Run the table's jobs one after another (or job ``job_index`` only); the exit status: 0 when every job
    that was asked for and can run has results."""
    jobs = table.jobs()
    if job_index is not None:
        if not 0 <= job_index < len(jobs):
            raise TableError(
                f"{table.path}: --job {job_index} is out of range: the table has jobs 0-{len(jobs) - 1}"
            )
        jobs = [jobs[job_index]]
    problems = {row: missing_configs(table, row) for row in {job.row: None for job in jobs}}
    unavailable = {row for row, lines in problems.items() if lines}
    for row in unavailable:
        for line in problems[row]:
            print(line, file=sys.stderr)
    if unavailable and not skip_missing:
        raise TableError(
            f"{table.path}: {len(unavailable)} row(s) cannot run (config missing); "
            "pass --skip-missing to run the others"
        )
    failures = 0
    for job in jobs:
        if job.row in unavailable:
            continue
        try:
            outcome = run_job(table, job, out, extra, launch)
        except JobFailed as error:
            failures += 1
            print(f"[job {job.index}] failed: {error}", file=sys.stderr, flush=True)
            continue
        except JobInterrupted as error:
            print(f"[job {job.index}] interrupted: {error}", file=sys.stderr, flush=True)
            return 1
        print(f"[job {job.index}] {job.name}: {outcome} ({job.folder(out) / RESULTS_RECORD})", flush=True)
    return 1 if failures else 0


def print_commands(table: Table, out: Path, extra: Sequence[str]) -> str:
    """Every job's two plain CLI commands (a SLURM array task runs job I with ``run ... --job I``)."""
    lines = []
    for job in table.jobs():
        lines.append(f"# job {job.index}: {job.name}")
        if job.row.fit:
            lines.append(shell_line(fit_command(job, out, extra)))
        lines.append(shell_line(test_command(table, job, out, extra)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ report
@dataclass(frozen=True)
class Cell:
    values: tuple[float, ...]  # one per seed with results, scaled for display

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds; None with fewer than two."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None


STEP_KEY = re.compile(r"^test/step_(?P<step>\d+)/(?P<metric>.+)$")


def step_values(metrics: Mapping[str, float], metric: str) -> dict[int, float]:
    """``{step: value}`` of a rollout's ``test/step_<n>/<name>`` for the column metric ``test/<name>``."""
    name = metric[len(TEST_PREFIX) :]
    steps = {}
    for key, value in metrics.items():
        match = STEP_KEY.match(key)
        if match and match["metric"] == name:
            steps[int(match["step"])] = value
    return dict(sorted(steps.items()))


def seed_value(table: Table, metrics: Mapping[str, float], column: Column) -> float | None:
    """A seed's value of a column: the metric, or for rollout tables its mean over the rollout steps."""
    if table.rollout is None:
        value = metrics.get(column.metric)
    else:
        steps = step_values(metrics, column.metric)
        value = statistics.fmean(steps.values()) if steps else None
    return None if value is None else value * column.scale


def collect_cells(table: Table, out: Path) -> dict[str, dict[str, Cell | None]]:
    """``{row label: {column title: Cell or None}}`` from the jobs' ``results.json``."""
    cells: dict[str, dict[str, Cell | None]] = {}
    for row in table.rows:
        cells[row.label] = {}
        for column in table.columns:
            values = []
            for seed in table.seeds:
                job = Job(0, row, table.datasets[column.dataset], seed)
                metrics = read_results(job.folder(out))
                value = None if metrics is None else seed_value(table, metrics, column)
                if value is not None:
                    values.append(value)
            cells[row.label][column.title] = Cell(tuple(values)) if values else None
    return cells


def best_rows(table: Table, cells: Mapping[str, Mapping[str, Cell | None]]) -> dict[str, set[str]]:
    """Per column title, the rows whose mean is the best as shown (ties at the shown decimals all count)."""
    best: dict[str, set[str]] = {}
    for column in table.columns:
        shown = {
            label: round(cell.mean, column.decimals)
            for label, row_cells in cells.items()
            if (cell := row_cells[column.title]) is not None
        }
        if shown:
            target = (max if column.higher_is_better else min)(shown.values())
            best[column.title] = {label for label, value in shown.items() if value == target}
        else:
            best[column.title] = set()
    return best


def format_cell(cell: Cell | None, column: Column, seeds: int) -> str:
    if cell is None:
        return "–"
    text = f"{cell.mean:.{column.decimals}f}"
    if cell.std is not None:
        text += f" ± {cell.std:.{column.decimals}f}"
    if len(cell.values) < seeds:
        text += f" (n={len(cell.values)})"
    return text


def markdown_table(table: Table, cells, best) -> str:
    arrows = {True: "↑", False: "↓"}
    header = ["Model", *(f"{column.title} {arrows[column.higher_is_better]}" for column in table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *["---:"] * len(table.columns)]) + "|"]
    for row in table.rows:
        entries = [row.label]
        for column in table.columns:
            text = format_cell(cells[row.label][column.title], column, len(table.seeds))
            entries.append(f"**{text}**" if row.label in best[column.title] else text)
        lines.append("| " + " | ".join(entries) + " |")
    seeds = ", ".join(str(seed) for seed in table.seeds)
    what = "mean over the rollout steps, then " if table.rollout else ""
    notes = [
        f"## {table.name}",
        "",
        *([f"{table.reference}", ""] if table.reference else []),
        f"Cells: {what}mean ± sample standard deviation over seeds {seeds} "
        "((n=k): only k seeds have results); best per column in bold; – not run.",
        "",
    ]
    return "\n".join([*notes, *lines]) + "\n"


def csv_table(table: Table, cells, best) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["model"]
    for column in table.columns:
        header += [f"{column.title} mean", f"{column.title} std", f"{column.title} n", f"{column.title} best"]
    writer.writerow(header)
    for row in table.rows:
        record = [row.label]
        for column in table.columns:
            cell = cells[row.label][column.title]
            if cell is None:
                record += ["", "", 0, 0]
            else:
                std = "" if cell.std is None else repr(cell.std)
                record += [repr(cell.mean), std, len(cell.values), int(row.label in best[column.title])]
        writer.writerow(record)
    return buffer.getvalue()


def rollout_series(table: Table, out: Path) -> dict[str, dict[str, dict[int, Cell]]]:
    """``{row label: {column title: {step: Cell over seeds}}}`` of a rollout table."""
    series: dict[str, dict[str, dict[int, Cell]]] = {}
    for row in table.rows:
        for column in table.columns:
            per_step: dict[int, list[float]] = {}
            for seed in table.seeds:
                metrics = read_results(Job(0, row, table.datasets[column.dataset], seed).folder(out))
                for step, value in step_values(metrics or {}, column.metric).items():
                    per_step.setdefault(step, []).append(value * column.scale)
            if per_step:
                steps = {step: Cell(tuple(values)) for step, values in sorted(per_step.items())}
                series.setdefault(row.label, {})[column.title] = steps
    return series


def step_time(rollout: Rollout, step: int) -> int:
    return rollout.first_time + (step - 1) * rollout.time_step


def rollout_csv(table: Table, series) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "metric", "step", "time", "mean", "std", "n"])
    for label, columns in series.items():
        for title, steps in columns.items():
            for step, cell in steps.items():
                std = "" if cell.std is None else repr(cell.std)
                writer.writerow(
                    [
                        label,
                        title,
                        step,
                        step_time(table.rollout, step),
                        repr(cell.mean),
                        std,
                        len(cell.values),
                    ]
                )
    return buffer.getvalue()


def write_rollout_plot(table: Table, series, path: Path) -> None:
    """Each metric per year for every model (the seed means), drawn by ``figures.metrics_per_step_figure``."""
    from figures import metrics_per_step_figure, save_png

    rows = {}
    for label, columns in series.items():
        for title, steps in columns.items():
            for step, cell in steps.items():
                rows.setdefault(f"{label} step {step}", {})[title] = cell.mean
    steps = sorted({step for columns in series.values() for s in columns.values() for step in s})
    labels = {step: str(step_time(table.rollout, step)) for step in steps}
    titles = [column.title for column in table.columns]
    save_png(metrics_per_step_figure(rows, titles, labels, title=table.name).figure, path)


def write_report(table: Table, out: Path) -> list[Path]:
    """``DIR/<table>.md`` and ``.csv``; for rollout tables also ``_per_step.csv`` and ``_per_step.png``."""
    cells = collect_cells(table, out)
    best = best_rows(table, cells)
    written = [out / f"{table.stem}.md", out / f"{table.stem}.csv"]
    markdown = markdown_table(table, cells, best)
    if table.rollout is not None:
        series = rollout_series(table, out)
        per_step_csv, plot = out / f"{table.stem}_per_step.csv", out / f"{table.stem}_per_step.png"
        with atomic_open(per_step_csv, "w") as stream:
            stream.write(rollout_csv(table, series))
        written.append(per_step_csv)
        if series:
            write_rollout_plot(table, series, plot)
            markdown += f"\nPer step ({per_step_csv.name}):\n\n![each metric per year]({plot.name})\n"
            written.append(plot)
    with atomic_open(written[0], "w") as stream:
        stream.write(markdown)
    with atomic_open(written[1], "w", newline="") as stream:
        stream.write(csv_table(table, cells, best))
    return written


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="python -m lightning_cli.experiments", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "fit and test every job not done yet"),
        ("report", "write the table (Markdown, CSV; per-step CSV and plot for rollouts)"),
        ("commands", "print every job's plain CLI commands"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("table", help="a table file, or the name of one in configs/tables/")
        sub.add_argument(
            "--out", type=Path, required=True, help="the table's folder (one run folder per job)"
        )
        if name == "run":
            sub.add_argument("--skip-missing", action="store_true", help="run the rows whose configs exist")
            sub.add_argument(
                "--job", type=int, help="run job I only (see `commands`), e.g. $SLURM_ARRAY_TASK_ID"
            )
            sub.add_argument(
                "--in-process", action="store_true", help="run the CLI in this process (no start-up)"
            )
    args = parser.parse_args(own)
    if extra and args.command == "report":
        parser.error("report takes no CLI arguments after --")
    try:
        table = load_table(args.table)
        out = args.out.resolve()
        if args.command == "run":
            launch = run_cli_in_process if args.in_process else run_cli_subprocess
            return run_table(table, out, extra, args.skip_missing, args.job, launch)
        if args.command == "commands":
            print(print_commands(table, out, extra))
            return 0
        written = write_report(table, out)
        print(written[0].read_text())
        print("\n".join(f"wrote {path}" for path in written))
        return 0
    except TableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
