"""The forecasting results table: one row per model, columns L1 MSE PSNR SSIM GSSIM LPIPS FID.

Each ``test`` run appends its row to a CSV file, so runs of different models (persistence, SimVP, PredRNN,
Sat-JEPA-Diff) are shown side by side: ``python -m metrics.table results.csv`` prints the table.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

COLUMNS = {
    "l1": "L1",
    "mse": "MSE",
    "psnr": "PSNR",
    "ssim": "SSIM",
    "gssim": "GSSIM",
    "lpips": "LPIPS",
    "fid": "FID",
}
"""Metric key -> column title, in table order."""
DECIMALS = {"psnr": 2}
DEFAULT_DECIMALS = 4
MODEL_FIELD = "model"
CSV_FIELDS = [MODEL_FIELD, *COLUMNS]


def metric_row(results: Mapping[str, float | Tensor], prefix: str = "test/") -> dict[str, float]:
    """The table's metrics from a logged-metrics dict such as ``trainer.test(...)[0]`` (``test/l1`` -> ``l1``)."""
    row = {}
    for key in COLUMNS:
        value = results.get(f"{prefix}{key}")
        if value is not None:
            row[key] = float(value)
    return row


def _format_value(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.{DECIMALS.get(key, DEFAULT_DECIMALS)}f}"


def format_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table with one row per model; a metric a model did not report shows as ``-``."""
    header = ["Model", *COLUMNS.values()]
    body = [
        [model, *(_format_value(key, metrics.get(key)) for key in COLUMNS)] for model, metrics in rows.items()
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), separator, *(line(cells) for cells in body)])


def append_row(csv_path: str | Path, model: str, metrics: Mapping[str, float]) -> None:
    """Append one model's metrics to ``csv_path`` (created with a header when new)."""
    unknown = sorted(set(metrics) - set(COLUMNS))
    if unknown:
        raise ValueError(f"append_row: unknown metric keys {unknown}; the table has {list(COLUMNS)}")
    csv_path = Path(csv_path)
    is_new = not csv_path.exists() or csv_path.stat().st_size == 0
    if not is_new:
        _check_header(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
        if is_new:
            writer.writeheader()
        writer.writerow({MODEL_FIELD: model, **{key: repr(float(value)) for key, value in metrics.items()}})


def _check_header(csv_path: Path) -> None:
    with csv_path.open(newline="") as file:
        header = next(csv.reader(file), [])
    if header != CSV_FIELDS:
        raise ValueError(f"{csv_path}: header {header} is not the results table's {CSV_FIELDS}")


def read_rows(csv_path: str | Path) -> dict[str, dict[str, float]]:
    """Rows of ``csv_path`` by model, in order of first appearance; a later row of the same model replaces it."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"results table not found: {csv_path}")
    _check_header(csv_path)
    rows: dict[str, dict[str, float]] = {}
    with csv_path.open(newline="") as file:
        for line_number, record in enumerate(csv.DictReader(file), start=2):
            metrics = {}
            for key in COLUMNS:
                text = record[key]
                if text in ("", None):
                    continue
                try:
                    metrics[key] = float(text)
                except ValueError as error:
                    raise ValueError(
                        f"{csv_path}:{line_number}: column {key!r} is not a number: {text!r}"
                    ) from error
            rows[record[MODEL_FIELD]] = metrics
    return rows


def main(argv: list[str] | None = None) -> None:
    """Print the table stored in a results CSV."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv_path", type=Path)
    print(format_table(read_rows(parser.parse_args(argv).csv_path)))


if __name__ == "__main__":
    main()
