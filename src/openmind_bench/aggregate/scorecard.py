"""One external checkpoint's scorecard: its results beside the from-scratch baselines of its
architecture, the deliverable an SSL3D-style evaluation hands back for a submitted checkpoint.

`write_scorecard` reads the checkpoint's metrics.json files and those of the scratch runs of its
architecture (other runs among the files are left out) and writes:

- a CSV (`SCORECARD_COLUMNS`, fractions, unrounded): per metric, schedule, fine-tuning epochs and
  low-data N, one row per dataset (`scope` "dataset") with the checkpoint's mean over cases, then
  folds, the scratch mean at the same architecture, epochs and N, their difference and the number of
  folds of each; then the rows of the means over datasets (`scope` "mean", and "mean_id" /
  "mean_ood" when the registry gives every dataset's domain), with the number of datasets of each
  (as in the benchmark table, a mean is over the datasets a run has values for: differing counts
  say that the checkpoint and scratch means are not over the same datasets);
- a Markdown file: the checkpoint's provenance (source, revision, commit, sha256, format,
  architecture), then one table per metric and fine-tuning setting, in percent.

The numbers are the benchmark table's (`table.build_table` on the same runs, the scratch row chosen
by `table.scratch_references`), so a scorecard and the table never disagree.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from openmind_bench import atomic
from openmind_bench.aggregate.collect import gather
from openmind_bench.aggregate.results import RUN_KEY, fold_values
from openmind_bench.aggregate.table import (
    METRIC_TITLES,
    build_table,
    dataset_columns,
    format_value,
    md_escape,
    provenance_items,
    scratch_references,
)
from openmind_bench.names import METRICS, SCRATCH, check_name
from openmind_bench.registry import DatasetSpec, usable_datasets
from openmind_bench.spreadsheet import neutralise_frame

log = logging.getLogger(__name__)

SCORECARD_COLUMNS = ["checkpoint", "architecture", "metric", "schedule", "epochs", "low_data_n", "scope", "dataset",
                     "domain", "checkpoint_mean", "scratch_mean", "delta_scratch", "folds", "scratch_folds", "datasets",
                     "scratch_datasets"]
MEAN_SCOPES = {"mean": "Mean", "mean_id": "ID mean", "mean_ood": "OOD mean"}


class ScorecardError(ValueError):
    """The metrics files hold no runs of the checkpoint the scorecard is asked for."""


def scorecard_paths(out_dir: str | Path, checkpoint: str) -> tuple[Path, Path]:
    """`OUT_DIR/scorecard_{checkpoint}.csv` and `.md` (the name checked, so it cannot leave OUT_DIR)."""
    check_name(checkpoint, "checkpoint")
    out_dir = Path(out_dir)
    return out_dir / f"scorecard_{checkpoint}.csv", out_dir / f"scorecard_{checkpoint}.md"


def scorecard(metrics_paths, checkpoint: str,
              registry: dict[str, DatasetSpec] | None = None) -> tuple[pd.DataFrame, dict]:
    """The scorecard rows (`SCORECARD_COLUMNS`) and the checkpoint's provenance."""
    registry = registry or {}
    paths = list(metrics_paths)
    collected = gather(paths)
    provenance = collected.external.get(checkpoint)
    if provenance is None:
        others = sorted(collected.external)
        raise ScorecardError(f"no runs of external checkpoint {checkpoint!r} among the {len(paths)} metrics.json files"
                             + (f"; the external checkpoints there: {others}" if others else
                                " (none of them is an external checkpoint's run)"))
    runs = collected.runs
    own = runs[runs.method == checkpoint]
    scratch = runs[(runs.method == SCRATCH) & runs.base_architecture.isin(set(own.base_architecture))]
    if scratch.empty:
        log.warning("%s: no from-scratch runs of architecture %s among the files: the scratch columns stay empty",
                    checkpoint, sorted(set(own.base_architecture)))
    keep = set(map(tuple, pd.concat([own, scratch])[RUN_KEY].to_numpy()))
    long = collected.long[[run in keep for run in zip(*(collected.long[c] for c in RUN_KEY))]]

    table = build_table(long, registry).set_index([*RUN_KEY, "metric"])
    folds = fold_values(long).groupby(level=[*RUN_KEY, "metric", "dataset"]).size()
    datasets = dataset_columns(table.reset_index())
    records = []
    for run, setting in own.set_index(RUN_KEY).iterrows():
        for metric in [m for m in METRICS if (*run, m) in table.index]:
            row = table.loc[(*run, metric)]
            refs = scratch_references(run, [r[:3] for r in table.index if r[3] == metric])
            ref = table.loc[(*refs[0], metric)] if len(refs) == 1 else None
            common = {"checkpoint": checkpoint, "architecture": setting.base_architecture, "metric": metric,
                      "schedule": run[2], "epochs": setting.epochs, "low_data_n": setting.low_data_n}
            for dataset in datasets:
                if pd.isna(row[dataset]):
                    continue
                spec = registry.get(dataset)
                records.append({
                    **common, "scope": "dataset", "dataset": dataset, "domain": spec.domain if spec else None,
                    **_compared(row[dataset], None if ref is None else ref[dataset]),
                    "folds": folds.get((*run, metric, dataset)),
                    "scratch_folds": folds.get((*refs[0], metric, dataset)) if ref is not None else None,
                })
            for scope in MEAN_SCOPES:
                if pd.isna(row[scope]):
                    continue
                records.append({**common, "scope": scope,
                                **_compared(row[scope], None if ref is None else ref[scope]),
                                "datasets": _count_in(row, scope, datasets, registry),
                                "scratch_datasets": None if ref is None else _count_in(ref, scope, datasets, registry)})
    frame = pd.DataFrame(records).reindex(columns=SCORECARD_COLUMNS)
    for column in ("folds", "scratch_folds", "datasets", "scratch_datasets", "low_data_n"):
        frame[column] = frame[column].astype("Int64")
    order = [_setting_order(*key) for key in zip(frame.metric, frame.schedule, frame.epochs, frame.low_data_n,
                                                  frame.architecture)]
    frame = frame.iloc[sorted(range(len(frame)), key=order.__getitem__)]  # stable: datasets, then means
    return frame.reset_index(drop=True), provenance


def _count_in(row: pd.Series, scope: str, datasets: list[str], registry: dict[str, DatasetSpec]) -> int:
    """How many datasets a mean of `row` is over (those with a value, of the scope's domain)."""
    return sum(1 for d in datasets if pd.notna(row[d])
               and (scope == "mean" or (d in registry and f"mean_{registry[d].domain}" == scope)))


def _compared(value: float, scratch_value: float | None) -> dict:
    scratch_value = None if scratch_value is None or pd.isna(scratch_value) else float(scratch_value)
    return {"checkpoint_mean": float(value), "scratch_mean": scratch_value,
            "delta_scratch": None if scratch_value is None else float(value) - scratch_value}


def _setting_order(metric, schedule, epochs, low_data_n, architecture) -> tuple:
    """Metric in table order, then schedule, epochs, full data before low data by N."""
    return (METRICS.index(metric), str(schedule), int(epochs) if pd.notna(epochs) and str(epochs).isdigit() else -1,
            -1 if pd.isna(low_data_n) else int(low_data_n), str(architecture))


def _settings(frame: pd.DataFrame) -> list[tuple]:
    """(metric, schedule, epochs, low_data_n, architecture), in `_setting_order`."""
    keys = frame[["metric", "schedule", "epochs", "low_data_n", "architecture"]].drop_duplicates()
    return sorted(map(tuple, keys.to_numpy()), key=lambda k: _setting_order(*k))


def render_scorecard(frame: pd.DataFrame, checkpoint: str, provenance: dict) -> str:
    """The Markdown scorecard: provenance, then a table per metric and fine-tuning setting."""
    out = [f"# Scorecard: {md_escape(checkpoint)}", "",
           "An external checkpoint fine-tuned with the benchmark's protocol, beside the from-scratch runs of "
           "its architecture at the same fine-tuning epochs and number of training cases. Mean over cases, "
           "then folds, in percent; Δ scratch in percentage points; –: missing.", "",
           "| Provenance | |", "|:---|:---|"]
    items = dict(provenance_items(provenance))
    if provenance.get("sha256"):
        items["sha256"] = provenance["sha256"]  # the whole digest here: this is the record of what was scored
    if provenance.get("kind"):
        items = {"source": items.pop("source"), "kind": provenance["kind"], **items}
    if provenance.get("architecture"):
        items["architecture"] = ", ".join(f"{k} {v}" for k, v in provenance["architecture"].items())
    out += [f"| {what} | {md_escape(str(value))} |" for what, value in items.items()]
    for metric, schedule, epochs, low_data_n, architecture in _settings(frame):
        rows = frame[(frame.metric == metric) & (frame.schedule == schedule) & (frame.architecture == architecture)
                     & _same(frame.epochs, epochs) & _same(frame.low_data_n, low_data_n)]
        cases = "all training cases" if pd.isna(low_data_n) else f"{int(low_data_n)} training cases"
        budget = f"{epochs} epochs, " if pd.notna(epochs) else ""
        out += ["", f"## {METRIC_TITLES[metric]}: {md_escape(str(schedule))}, {budget}{cases}", "",
                f"Architecture {md_escape(str(architecture))}.", "",
                "| Dataset | Domain | Checkpoint | Scratch | Δ scratch | Folds (checkpoint / scratch) |",
                "|:---|:---|---:|---:|---:|---:|"]
        for _, r in rows.iterrows():
            if r.scope == "dataset":
                name, folds = md_escape(str(r.dataset)), _count(r.folds, r.scratch_folds)
                domain = "" if pd.isna(r.domain) else str(r.domain).upper()
            else:
                name, folds, domain = f"**{MEAN_SCOPES[r.scope]}** ({_datasets(r)})", "", ""
            cells = [format_value(r.checkpoint_mean, "value"), format_value(r.scratch_mean, "value"),
                     format_value(r.delta_scratch, "delta")]
            out.append("| " + " | ".join([name, domain, *[c or "–" for c in cells], folds]) + " |")
    return "\n".join(out) + "\n"


def _same(column: pd.Series, value) -> pd.Series:
    return column.isna() if pd.isna(value) else column == value


def _datasets(r: pd.Series) -> str:
    counts = f"{r.datasets}" if pd.isna(r.scratch_datasets) or r.scratch_datasets == r.datasets \
        else f"{r.datasets} / {r.scratch_datasets}"
    return f"{counts} dataset{'' if counts == '1' else 's'}"


def _count(own, scratch) -> str:
    return f"{own}" if pd.isna(scratch) else f"{own} / {scratch}"


def write_scorecard(metrics_paths, checkpoint: str, out_csv: str | Path, out_md: str | Path,
                    registry: str | Path | None = None) -> pd.DataFrame:
    """Write the scorecard of external checkpoint `checkpoint` (CSV and Markdown, each atomically)
    from its metrics.json files and those of the scratch runs of its architecture. `registry`: the
    dataset registry file giving ID/OOD domains (None: no ID/OOD means). Returns the CSV's rows."""
    frame, provenance = scorecard(metrics_paths, checkpoint, usable_datasets(registry) if registry else {})
    with atomic.atomic_path(out_csv) as tmp:
        neutralise_frame(frame).to_csv(tmp, index=False, encoding="utf-8")
    atomic.write_text(out_md, render_scorecard(frame, checkpoint, provenance))
    log.info("scorecard of %s: %d rows in %s and %s", checkpoint, len(frame), out_csv, out_md)
    return frame
