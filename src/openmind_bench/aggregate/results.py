"""Read and check the long results table that every aggregation step starts from.

`RESULTS.csv` has one value per row::

    method,architecture,schedule,dataset,metric,value[,fold][,case]

A row with a `case` is one case's value; a row without one already summarises its dataset (or,
when `fold` is given, one fold of it). Per dataset the value is the mean over cases, then over
folds, as in the papers. A fold `K/sS` is fold K of seed S of a run repeated over seeds
(`fold_label`): seeds are averaged like folds, and the bootstrap resamples them. Values are fractions in [0, 1] (the tables show percentages); every metric
is higher-is-better. Other columns are ignored.

Errors name the file, the line and the column, so a bad row can be found with an editor.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from openmind_bench.names import METRICS

log = logging.getLogger(__name__)

RUN_KEY = ["method", "architecture", "schedule"]
SEED_MARK = "/s"  # fold label of one seed of a run repeated over seeds: `{fold}/s{seed}`


def fold_label(fold, seed: int | None) -> str:
    """The fold column of one run's values: the fold, and `/s{seed}` for a run of `finetune.seeds`."""
    return str(fold) if seed is None else f"{fold}{SEED_MARK}{int(seed)}"


def base_fold(label: str) -> str:
    """The fold of a fold label (`fold_label`), without its seed."""
    return str(label).split(SEED_MARK, 1)[0]
REQUIRED_COLUMNS = [*RUN_KEY, "dataset", "metric", "value"]
OPTIONAL_COLUMNS = ["fold", "case"]


class ResultsFormatError(ValueError):
    """The results file cannot be read as the long format described in this module."""


def _fail(source: str, line: int, column: str, message: str) -> None:
    raise ResultsFormatError(f"{source} line {line}, column '{column}': {message}")


def read_results(path: str | Path) -> pd.DataFrame:
    """Read and validate RESULTS.csv; see `validate` for the returned frame."""
    path = Path(path)
    if not path.is_file():
        raise ResultsFormatError(f"results file {path} does not exist")
    try:
        # Blank lines are kept as rows so that row i is line i + 2 (header = line 1).
        raw = pd.read_csv(
            path, dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8-sig"
        )
    except pd.errors.EmptyDataError:
        raise ResultsFormatError(f"results file {path} is empty (no header line)") from None
    except pd.errors.ParserError as e:
        raise ResultsFormatError(f"results file {path} cannot be parsed as CSV: {e}") from None
    return validate(raw, source=str(path))


def validate(raw: pd.DataFrame, source: str = "<results>") -> pd.DataFrame:
    """Check a string-typed frame and return it typed.

    Returns columns method, architecture, schedule, dataset, metric, fold ("" when absent), case
    ("" when absent), value (float) and line (the row's line in the file).
    """
    raw = raw.rename(columns=lambda c: str(c).strip())
    if "strategy" in raw.columns and "schedule" not in raw.columns:
        raw = raw.rename(columns={"strategy": "schedule"})  # the column's name in earlier versions
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise ResultsFormatError(
            f"{source} line 1: missing required column(s) {missing}; "
            f"the header has {list(raw.columns)}, expected {REQUIRED_COLUMNS} plus optional {OPTIONAL_COLUMNS}"
        )
    frame = pd.DataFrame({"line": np.arange(len(raw), dtype=int) + 2})
    for column in [*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS]:
        values = raw[column] if column in raw.columns else pd.Series("", index=raw.index)
        frame[column] = values.fillna("").astype(str).str.strip().to_numpy()

    # A blank line anywhere but at the end is almost certainly a broken file.
    blank = (frame[[*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS]] == "").all(axis=1).to_numpy()
    last_filled = np.flatnonzero(~blank)
    frame = frame.iloc[: last_filled[-1] + 1 if len(last_filled) else 0]
    blank = blank[: len(frame)]
    if blank.any():
        _fail(source, int(frame.line.iloc[np.argmax(blank)]), REQUIRED_COLUMNS[0], "blank line")
    if frame.empty:
        raise ResultsFormatError(f"{source}: no result rows after the header")

    problems: list[tuple[int, str, str]] = []  # (line, column, message); report the first
    for column in ["method", "architecture", "schedule", "dataset", "metric"]:
        empty = frame[column] == ""
        if empty.any():
            problems.append((int(frame.line[empty].iloc[0]), column, "empty value"))
    bad_metric = (frame.metric != "") & ~frame.metric.isin(METRICS)
    if bad_metric.any():
        first = frame[bad_metric].iloc[0]
        problems.append(
            (int(first.line), "metric", f"unknown metric {first.metric!r}; expected one of {METRICS}")
        )
    value = pd.to_numeric(frame.value, errors="coerce").astype(float)
    not_number = ~np.isfinite(value.to_numpy())
    if not_number.any():
        i = int(np.argmax(not_number))
        problems.append((int(frame.line.iloc[i]), "value", f"{frame.value.iloc[i]!r} is not a finite number"))
    out_of_range = np.isfinite(value) & ((value < 0) | (value > 1))
    if out_of_range.any():
        i = int(np.argmax(out_of_range.to_numpy()))
        problems.append(
            (
                int(frame.line.iloc[i]),
                "value",
                f"{frame.value.iloc[i]} is outside [0, 1] (values are fractions, not percentages)",
            )
        )
    if problems:
        line, column, message = min(problems)
        _fail(source, line, column, message)
    frame["value"] = value.to_numpy()

    cell = [*RUN_KEY, "dataset", "metric", "fold", "case"]
    dup = frame.duplicated(cell, keep=False)
    if dup.any():
        first, second = frame[dup].groupby(cell, sort=False).line.apply(list).iloc[0][:2]
        _fail(
            source,
            second,
            "case",
            f"duplicate of line {first} (same method, architecture, schedule, dataset, metric, fold and case)",
        )

    # Per-case rows and a summary row for the same fold would be averaged together: refuse.
    group = [*RUN_KEY, "dataset", "metric", "fold"]
    has_case = frame.case != ""
    mixed = frame.assign(_c=has_case).groupby(group, sort=False)._c.transform("nunique") > 1
    if mixed.any():
        row = frame[mixed & ~has_case].iloc[0]
        same_fold = (frame[group] == row[group]).all(axis=1) & has_case
        case_line = int(frame.line[same_fold].iloc[0])
        _fail(
            source,
            int(row.line),
            "case",
            f"summary row (no case) for a fold that also has per-case rows (e.g. line {case_line}); "
            "give one or the other",
        )
    return frame.reset_index(drop=True)


def fold_values(frame: pd.DataFrame) -> pd.Series:
    """Mean over cases per (run, metric, dataset, fold); a summary row is its own mean."""
    return frame.groupby([*RUN_KEY, "metric", "dataset", "fold"], sort=False).value.mean()


def dataset_values(frame: pd.DataFrame) -> pd.Series:
    """Mean over cases, then over folds, per (method, architecture, schedule, metric, dataset)."""
    return fold_values(frame).groupby(level=[*RUN_KEY, "metric", "dataset"], sort=False).mean()


def run_label(run: tuple[str, str, str] | pd.Series) -> str:
    """How a run is named in plots: 'method / architecture / schedule'."""
    if isinstance(run, pd.Series):
        run = tuple(run[c] for c in RUN_KEY)
    return " / ".join(str(p) for p in run)


def present_metrics(frame: pd.DataFrame) -> list[str]:
    return [m for m in METRICS if (frame.metric == m).any()]
