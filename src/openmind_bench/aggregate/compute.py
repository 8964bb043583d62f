"""What the benchmark's runs cost, from their compute ledgers (`engine.ledger`, compute.json).

`ledger_table(metrics_paths, labels)` finds the ledger beside every fine-tuning run's metrics.json
and the ledger of the pre-training run it fine-tunes (`results/pretrain/{run}/compute.json`, found
from the run folder's name and the results layout), one row per run: `COLUMNS`
(`results/benchmark/compute.csv`). Runs without a ledger (zero-shot scores, runs of earlier
versions) have no row.

The table's cost of a row (method, architecture, schedule labels): the GPU-hours of its fine-tuning
runs (every dataset and fold) plus those of the pre-training runs they fine-tune, each once; CPU runs
count CPU-hours, shown with their unit (`cost_labels`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from openmind_bench import names
from openmind_bench.engine import ledger as engine_ledger

log = logging.getLogger(__name__)

FILE_NAME = "compute.csv"
LABEL_COLUMNS = ["method", "architecture", "schedule"]
COLUMNS = ["kind", "run", "pretrain_run", "dataset", "fold", *LABEL_COLUMNS, "stage", "status", "segments",
           "device_type", "device_name", "device_count", "nodes", "precision", "wall_seconds", "gpu_hours",
           "cpu_hours", "steps", "steps_per_second", "peak_memory_gib", "flops_per_step", "flops_note", "mfu",
           "data_wait_ms_per_step", "data_wait_fraction", "path"]


def pretrain_ledger_path(metrics_path: Path, pretrain_run: str) -> Path:
    """results/pretrain/{run}/compute.json for results/downstream/{dataset}/{run}/fold_{k}/metrics.json."""
    results = Path(metrics_path).parents[3].parent  # the folder that holds downstream/ and pretrain/
    relative = Path(names.PRETRAIN_DIR.format(run=pretrain_run)).relative_to(Path(names.DOWNSTREAM_ROOT).parent)
    return results / relative / engine_ledger.LEDGER_FILE


def _row(doc: dict, path: Path, **identity) -> dict:
    peaks = doc.get("peak_memory_bytes") or []
    row = {k: doc.get(k) for k in COLUMNS if k in doc}
    row.update(identity, path=str(path), peak_memory_gib=max(peaks) / 2**30 if peaks else None)
    return row


def ledger_table(metrics_paths, labels: dict[str, tuple[str, str, str]] | None = None) -> pd.DataFrame:
    """One row per run with a ledger (module doc); `labels`: metrics.json path -> the table's
    (method, architecture, schedule) labels of its run (`collect.Collected.run_labels`)."""
    labels = labels or {}
    rows, pretrain_rows = [], {}
    for metrics in sorted(Path(p) for p in metrics_paths):
        run_name = metrics.parent.parent.name
        try:
            parsed = names.parse_run(run_name)
        except names.InvalidName:
            parsed = None
        pretrain_run = parsed.pretrain_run if parsed is not None else None
        method, architecture, schedule = labels.get(str(metrics), (None, None, None))
        ledger = metrics.parent / engine_ledger.LEDGER_FILE
        if ledger.is_file():
            rows.append(_row(engine_ledger.read(ledger), ledger, kind="finetune", run=run_name,
                             pretrain_run=pretrain_run, dataset=metrics.parent.parent.parent.name,
                             fold=metrics.parent.name.removeprefix("fold_"), method=method,
                             architecture=architecture, schedule=schedule))
        if pretrain_run and pretrain_run not in pretrain_rows:
            path = pretrain_ledger_path(metrics, pretrain_run)
            if path.is_file():
                pretrain_rows[pretrain_run] = _row(engine_ledger.read(path), path, kind="pretrain", run=pretrain_run,
                                                   pretrain_run=pretrain_run, method=method,
                                                   architecture=parsed.architecture, schedule=None)
    frame = pd.DataFrame([*pretrain_rows.values(), *rows], columns=COLUMNS)
    log.info("compute ledgers: %d pre-training and %d fine-tuning runs", len(pretrain_rows), len(rows))
    return frame


def empty_table() -> pd.DataFrame:
    return pd.DataFrame(columns=COLUMNS)


def read_table(path: str | Path) -> pd.DataFrame:
    """A compute.csv as `ledger_table` made it."""
    return pd.read_csv(path, dtype={"fold": str, "run": str, "pretrain_run": str})


def cost_labels(frame: pd.DataFrame) -> dict[tuple[str, str, str], str]:
    """(method, architecture, schedule) -> "12.3 GPU-h" (or "0.021 CPU-h" where no run of the row had a GPU):
    fine-tuning plus the pre-training runs fine-tuned, each once (module doc)."""
    out = {}
    if frame is None or frame.empty:
        return out
    finetune = frame[frame.kind == "finetune"]
    pretrain = frame[frame.kind == "pretrain"].drop_duplicates("run").set_index("run")
    for key, runs in finetune.groupby(LABEL_COLUMNS, dropna=False, sort=False):
        if any(pd.isna(k) for k in key):
            continue
        parts = [runs]
        used = [r for r in runs.pretrain_run.dropna().unique() if r in pretrain.index]
        if used:
            parts.append(pretrain.loc[used].reset_index())
        both = pd.concat(parts, ignore_index=True)
        if both.gpu_hours.notna().any():
            out[tuple(key)] = f"{both.gpu_hours.sum():.3g} GPU-h"
        elif both.cpu_hours.notna().any():
            out[tuple(key)] = f"{both.cpu_hours.sum():.3g} CPU-h"
    return out


def hours_by_method_and_architecture(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """(method x base architecture table of hours, split into pre-training and fine-tuning columns,
    the unit "GPU-hours" or "CPU-hours"): GPU-hours where any run had a GPU, else CPU-hours."""
    unit = "GPU-hours" if frame.gpu_hours.notna().any() else "CPU-hours"
    column = "gpu_hours" if unit == "GPU-hours" else "cpu_hours"
    base = frame.assign(base_architecture=[_base_architecture(r) for _, r in frame.iterrows()])
    table = (base.groupby(["method", "base_architecture", "kind"])[column].sum(min_count=1)
             .unstack("kind").reindex(columns=["pretrain", "finetune"]).fillna(0.0))
    return table, unit


def _base_architecture(row) -> str:
    """The architecture without the table's budget suffix ("ResEncL (1000 ep)" -> "ResEncL")."""
    text = row["architecture"] if isinstance(row["architecture"], str) else ""
    return text.split(" (")[0] or "?"
