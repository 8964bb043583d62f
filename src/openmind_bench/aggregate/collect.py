"""Gather the fine-tuning stage's `metrics.json` files into the long RESULTS.csv.

The downstream stage writes one file per dataset, run and fold, at
`results/downstream/{dataset}/{run}/fold_{k}/metrics.json`, shaped like this::

    {
      "dataset": "D1_MSFLAIR",                          # required
      "run": "mae__resenc_l__openmind__sawtooth__150",  # optional, only quoted in messages
      "method": "mae",                                  # required; "scratch" for from-scratch runs
      "architecture": "resenc_l",                       # required
      "schedule": "sawtooth",                           # fine-tuning schedule; may be absent for scratch
      "selection": "openmind",                          # pre-training data selection; optional
      "epochs": 150,                                    # fine-tuning epochs; optional
      "fold": 0,                                        # required (int or string)
      "cases": [                                        # per-case values, optional
        {"case": "sub-001", "DSC": 0.81, "NSD": 0.90},
        ...
      ],
      "summary": {"DSC": 0.80, "NSD": 0.91}             # per-fold values, optional
    }

Metric keys are DSC, NSD, balanced_accuracy, AUROC (fractions in [0, 1]); other keys (per-class
values, losses, ...) are ignored. A metric found in `cases` is written per case and its summary
value is not used (the table averages cases itself); a metric only in `summary` (classification:
balanced accuracy and AUROC are not per-case quantities) is written as one per-fold row. A per-case
value of null/NaN (nnU-Net's DSC when reference and prediction are both empty) is left out of the
mean, as nnU-Net's own summary does.

Run identity comes from the JSON fields, never from the path. The long format's run key is
(method, architecture, schedule), so run properties outside that key are folded into the labels,
but only when they vary among the collected runs: the pre-training selection is appended to the
method ("mae [openmind_t1]") when pre-trained runs use more than one selection, and the epochs to
the architecture ("resenc_l (1000 ep)") when runs use more than one epoch count. The latter keeps
delta_scratch a comparison at equal fine-tuning budget. From-scratch runs without a schedule get
schedule "none".
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd

from openmind_bench import atomic
from openmind_bench.names import METRICS, NO_SCHEDULE, SCRATCH
from openmind_bench.spreadsheet import neutralise_frame

log = logging.getLogger(__name__)

COLUMNS = ["method", "architecture", "schedule", "dataset", "metric", "value", "fold", "case"]
PATTERN = "*/*/fold_*/metrics.json"


class CollectError(ValueError):
    """A metrics.json file that does not have the documented shape."""


def find_metrics_files(root: str | Path) -> list[Path]:
    """Every `{dataset}/{run}/fold_{k}/metrics.json` below `root` (e.g. results/downstream)."""
    return sorted(Path(root).glob(PATTERN))


def _text(doc: dict, key: str, path: Path, required: bool = True) -> str | None:
    value = doc.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise CollectError(f"{path}: field '{key}' is missing or empty")
        return None
    if isinstance(value, (dict, list, bool)):
        raise CollectError(f"{path}: field '{key}' must be a string or number, got {value!r}")
    return str(value).strip()


def _metric_value(value, where: str, path: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CollectError(f"{path}: {where} is {value!r}, not a number")
    value = float(value)
    if math.isnan(value):
        return None
    if not 0.0 <= value <= 1.0:
        raise CollectError(f"{path}: {where} = {value} is outside [0, 1] (values are fractions)")
    return value


def read_metrics_json(path: str | Path) -> dict:
    """One metrics.json as {'run': fields..., 'rows': [(metric, value, case), ...], 'skipped': n}."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CollectError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CollectError(f"{path}: the top level must be an object")
    fields = {
        "dataset": _text(doc, "dataset", path),
        "method": _text(doc, "method", path),
        "architecture": _text(doc, "architecture", path),
        "fold": _text(doc, "fold", path),
        # `strategy`: the name metrics.json files of earlier versions used for the schedule
        "schedule": _text(doc, "schedule" if "schedule" in doc else "strategy", path, required=False),
        "selection": _text(doc, "selection", path, required=False),
        "epochs": _text(doc, "epochs", path, required=False),
        "run": _text(doc, "run", path, required=False),
    }
    if fields["schedule"] is None:
        if fields["method"] != SCRATCH:
            raise CollectError(f"{path}: field 'schedule' is missing (only scratch runs may omit it)")
        fields["schedule"] = NO_SCHEDULE

    cases = doc.get("cases") or []
    summary = doc.get("summary") or {}
    if not isinstance(cases, list):
        raise CollectError(f"{path}: 'cases' must be a list of objects")
    if not isinstance(summary, dict):
        raise CollectError(f"{path}: 'summary' must be an object")
    rows, skipped, seen = [], 0, set()
    per_case_metrics = set()
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or case.get("case") in (None, ""):
            raise CollectError(f"{path}: cases[{i}] must be an object with a 'case' id")
        case_id = str(case["case"])
        if case_id in seen:
            raise CollectError(f"{path}: case {case_id!r} appears twice in 'cases'")
        seen.add(case_id)
        for metric in METRICS:
            if metric not in case:
                continue
            per_case_metrics.add(metric)
            value = _metric_value(case[metric], f"cases[{i}].{metric}", path)
            if value is None:
                skipped += 1
            else:
                rows.append((metric, value, case_id))
    for metric in METRICS:
        if metric in summary and metric not in per_case_metrics:
            value = _metric_value(summary[metric], f"summary.{metric}", path)
            if value is not None:
                rows.append((metric, value, ""))
    if not rows:
        raise CollectError(f"{path}: no values of any known metric {METRICS} in 'cases' or 'summary'")
    return {"run": fields, "rows": rows, "skipped": skipped}


def collect(paths) -> pd.DataFrame:
    """Long results rows (see `COLUMNS`) from metrics.json files; labels as the docstring says."""
    paths = sorted(Path(p) for p in paths)
    if not paths:
        raise CollectError("no metrics.json files to collect")
    parsed = [(p, read_metrics_json(p)) for p in paths]
    runs = [d["run"] for _, d in parsed]
    selections = {r["selection"] for r in runs if r["method"] != SCRATCH}
    epochs = {r["epochs"] for r in runs}
    tag_selection = len(selections) > 1
    tag_epochs = len(epochs) > 1
    if tag_selection:
        log.info("runs use several pre-training selections %s: appended to the method label",
                 sorted(selections, key=str))
    if tag_epochs:
        log.info("runs use several epoch counts %s: appended to the architecture label", sorted(epochs, key=str))

    records, owner = [], {}
    skipped = 0
    for path, doc in parsed:
        r = doc["run"]
        method = r["method"]
        if tag_selection and method != SCRATCH:
            method = f"{method} [{r['selection'] or 'default'}]"
        architecture = r["architecture"]
        if tag_epochs:
            architecture = f"{architecture} ({r['epochs'] or '?'} ep)"
        key = (method, architecture, r["schedule"], r["dataset"], r["fold"])
        if key in owner:
            raise CollectError(
                f"{owner[key]} and {path} both hold method {key[0]!r}, architecture {key[1]!r}, "
                f"schedule {key[2]!r}, dataset {key[3]!r}, fold {key[4]!r}"
            )
        owner[key] = path
        skipped += doc["skipped"]
        records += [
            (method, architecture, r["schedule"], r["dataset"], metric, value, r["fold"], case)
            for metric, value, case in doc["rows"]
        ]
    if skipped:
        log.info("%d per-case values were null/NaN and are left out of the means", skipped)
    long = pd.DataFrame(records, columns=COLUMNS)
    long["_metric_order"] = long.metric.map(METRICS.index)
    long = long.sort_values(["method", "architecture", "schedule", "dataset", "_metric_order", "fold", "case"],
                            kind="stable")
    return long.drop(columns="_metric_order").reset_index(drop=True)


def write_results(paths, out: str | Path) -> pd.DataFrame:
    """Collect `paths` and write RESULTS.csv to `out`."""
    long = collect(paths)
    with atomic.atomic_path(out) as tmp:
        neutralise_frame(long).to_csv(tmp, index=False)  # a CSV people open in spreadsheets
    log.info("collected %d values from %d metrics.json files into %s", len(long), len(set(map(str, paths))), out)
    return long
