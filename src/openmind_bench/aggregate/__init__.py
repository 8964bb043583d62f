"""Aggregation: from per-case results to the benchmark table, rank stability and figures.

`run` is the whole stage (what `openmind-bench aggregate` calls). It writes into `out`:

- `benchmark_table.csv` (unrounded; `external` marks external checkpoints' rows; `trained_share`
  the share of the network the row's runs trained, from their metrics.json),
  `benchmark_table.md`, `benchmark_table.tex` (external rows with a dagger, their sources below)
- `ranks_bootstrap.csv`: per run and metric, how many datasets were resampled or held fixed, the
  observed leaderboard position, its bootstrap mean, std and 95% interval, and the share of
  samples at each position (`share_rank_k`)
- `bootstrap_intervals.csv`: per run, metric and dataset, the value and its 95% bootstrap interval
- `delta_scratch_intervals.csv`: per run and metric with a from-scratch reference, the delta to it
  (the table's Δ scratch) and its 95% bootstrap interval (cases, and seeds where runs have several);
  the Markdown table shows the interval beside Δ scratch
- `compute.csv`: one row per run with a compute ledger (`aggregate.compute`); the Markdown table's
  Cost column sums it per row
- `plots/`: `heatmap_{metric}.png`, `rank_stability_{metric}.png`, `bars_{metric}_{dataset}.png`,
  `compute_hours.png` (GPU-hours per method x architecture, when there are ledgers),
  `probe_curve_{pre-training run}.png` (its probes over the pre-training epochs beside the balanced
  accuracy of its fine-tuning runs, for runs that probed: `pretrain.probe_every`)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from openmind_bench import atomic
from openmind_bench.aggregate.results import ResultsFormatError
from openmind_bench.names import METRICS
from openmind_bench.spreadsheet import neutralise_frame

log = logging.getLogger(__name__)

__all__ = ["OUTPUT_NAMES", "ResultsFormatError", "run"]

OUTPUT_NAMES = {
    "table_csv": "benchmark_table.csv",
    "table_md": "benchmark_table.md",
    "table_tex": "benchmark_table.tex",
    "ranks": "ranks_bootstrap.csv",
    "intervals": "bootstrap_intervals.csv",
    "deltas": "delta_scratch_intervals.csv",
    "compute": "compute.csv",
    "plots": "plots",
}


@dataclass
class Outputs:
    table_csv: Path
    table_md: Path
    table_tex: Path
    ranks: Path
    intervals: Path
    deltas: Path
    compute: Path
    plots: Path


def _write_csv(path: Path, frame) -> None:
    with atomic.atomic_path(path) as tmp:
        neutralise_frame(frame).to_csv(tmp, index=False, encoding="utf-8")


def _write_utf8(path: Path, text: str) -> None:
    # Explicit: the Markdown has Δ and – and dataset names may not be ASCII, whatever the locale.
    with atomic.atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def run(
    results: str | Path,
    out: str | Path,
    *,
    registry: str | Path | None,
    bootstrap_samples: int,
    seed: int,
    external: dict[str, dict] | None = None,
    compute=None,
    leakage: str | Path | None = None,
    trained: dict[tuple[str, str, str], float] | None = None,
    probe_runs: dict | None = None,
) -> Outputs:
    """Read RESULTS.csv and write every aggregation output into `out`; `external`: {method label:
    provenance} of the external checkpoints among the runs (`collect.Collected.external`); `compute`:
    the runs' compute ledgers (`compute.ledger_table`; None: an empty compute.csv, no Cost column);
    with `leakage` (results/curation/leakage.tsv) the tables get a footnote counting the excluded images;
    `trained`: {(method, architecture, schedule): share of the network trained} (`collect.Collected.trained`),
    the tables' trained_share / Trained column;
    `probe_runs`: `probe_histories`' {pre-training run: (progress rows, fine-tuning scores)}."""
    from openmind_bench.aggregate import compute as run_cost
    # Imported here: matplotlib and scipy are slow to import and only this stage needs them.
    from openmind_bench.aggregate import plots
    from openmind_bench.aggregate.bootstrap import bootstrap
    from openmind_bench.aggregate.results import read_results
    from openmind_bench.aggregate.table import (build_table, dataset_columns, leakage_note, render_latex,
                                                render_markdown, with_delta_intervals)
    from openmind_bench.curation.content import leakage_counts
    from openmind_bench.registry import usable_datasets

    out = Path(out)
    paths = Outputs(**{k: out / v for k, v in OUTPUT_NAMES.items()})
    frame = read_results(results)
    datasets_registry = usable_datasets(registry)
    log.info(
        "%d result rows: %d runs, %d datasets, metrics %s",
        len(frame),
        len(frame[["method", "architecture", "schedule"]].drop_duplicates()),
        frame.dataset.nunique(),
        sorted(frame.metric.unique(), key=METRICS.index),
    )

    table = build_table(frame, datasets_registry, external, trained)
    dataset_order = dataset_columns(table)
    log.info("bootstrap: %d samples, seed %d", bootstrap_samples, seed)
    boot = bootstrap(frame, bootstrap_samples, seed, dataset_order=dataset_order)
    table = with_delta_intervals(table, boot.deltas)
    _write_csv(paths.table_csv, table)
    if compute is None:
        compute = run_cost.empty_table()
    _write_csv(paths.compute, compute)
    note = leakage_note(leakage_counts(leakage) if leakage is not None and Path(leakage).is_file() else None)
    notes = [note] if note else []
    _write_utf8(paths.table_md, render_markdown(table, external, cost=run_cost.cost_labels(compute), notes=notes))
    _write_utf8(paths.table_tex, render_latex(table, external, notes=notes))
    _write_csv(paths.ranks, boot.ranks)
    _write_csv(paths.intervals, boot.intervals)
    _write_csv(paths.deltas, boot.deltas)

    # Built aside and swapped in whole, so no figure of an earlier run survives in plots/, and a reader
    # or a second writer (the command line beside a workflow run) never meets a half-written folder.
    with atomic.atomic_path(paths.plots) as tmp:
        tmp.mkdir()
        written = plots.write_all(table, boot.ranks, boot.intervals, tmp)
        if len(compute):
            written.append(plots.compute_hours(compute, tmp / "compute_hours.png"))
        written += plots.probe_curves(probe_runs or {}, tmp)
    log.info("wrote %s, %s, %s, %s and %d figures in %s", paths.table_csv.name, paths.table_md.name,
             paths.table_tex.name, paths.ranks.name, len(written), paths.plots)
    return paths


def benchmark_table(metrics, out: str | Path, *, registry: str | Path | None, bootstrap_samples: int, seed: int,
                    results_csv: str | Path | None = None, leakage: str | Path | None = None) -> Outputs:
    """The whole stage from metrics.json files: gather them into `results_csv` (default
    OUT/results_long.csv) and their runs' compute ledgers, then `run`. What rule benchmark_table and
    `openmind-bench benchmark-table` call."""
    from openmind_bench.aggregate.collect import write_results
    from openmind_bench.aggregate.compute import ledger_table

    out = Path(out)
    results_csv = Path(results_csv) if results_csv else out / "results_long.csv"
    metrics = list(metrics)
    collected = write_results(metrics, results_csv)
    return run(results_csv, out, registry=registry, bootstrap_samples=bootstrap_samples, seed=seed,
               external=collected.external, compute=ledger_table(metrics, collected.run_labels), leakage=leakage,
               trained=collected.trained, probe_runs=probe_histories(metrics))


def probe_histories(metrics) -> dict[str, tuple[list[dict], dict[str, float]]]:
    """{pre-training run: (its progress.csv rows, {'{dataset} {schedule}': balanced accuracy of its
    fine-tuning runs on the fixed test split})} for the pre-training runs of `metrics` (metrics.json
    paths under results/downstream/) whose progress.csv holds probe scores."""
    import csv
    import json

    from openmind_bench.aggregate.compute import pretrain_ledger_path
    from openmind_bench.names import InvalidName, parse_probe_column, parse_run

    out: dict[str, tuple[list[dict], dict[str, float]]] = {}
    unprobed: set[str] = set()
    for path in map(Path, metrics):
        doc = json.loads(path.read_text())
        try:
            name = parse_run(str(doc.get("run")))
        except InvalidName:
            continue
        if name.pretrain_run is None or name.pretrain_run in unprobed:
            continue
        if name.pretrain_run not in out:
            progress = pretrain_ledger_path(path, name.pretrain_run).with_name("progress.csv")
            rows = list(csv.DictReader(progress.open())) if progress.is_file() else []
            if not any(parse_probe_column(k) for k in (rows[0] if rows else {})):
                unprobed.add(name.pretrain_run)
                continue
            out[name.pretrain_run] = (rows, {})
        value = (doc.get("summary") or {}).get("balanced_accuracy")
        if doc.get("task") == "cls" and str(doc.get("fold")) == "test" and value is not None and not name.low_data_n:
            out[name.pretrain_run][1][f"{doc['dataset']} {name.schedule}"] = float(value)
    return out
