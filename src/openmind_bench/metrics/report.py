"""A fine-tuning run's `metrics.json` (+ `metrics.csv`), in the shape the aggregation stage reads.

The shape is the one `openmind_bench.aggregate.collect` documents: run identity fields, `cases`
(one object per test case with its DSC/NSD, so the aggregation can bootstrap over cases) and
`summary`. NaN (nnU-Net's value for a class absent from both reference and prediction) is written
as JSON null and left out of every mean. Per-class values ride along under `per_class`; the
aggregation ignores them. Classification runs carry balanced accuracy and AUROC in `summary` only
(they are not per-case quantities); their cases hold label, prediction and probabilities.

Three identity fields are written only when set, so files of earlier versions stay valid:
`low_data_n` (a low-data run, name ending `__n{N}`, trained on N cases), `seed` (a run of
`finetune.seeds`, name ending `__s{S}`) and `external_checkpoint`
(the provenance of an external checkpoint's run; its `method` is the checkpoint's name, its
`architecture` the one its scratch baseline uses, its `selection` null).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from openmind_bench import atomic
from openmind_bench.names import SCRATCH
from openmind_bench.spreadsheet import neutralise_cell
from openmind_bench.metrics.classification import classification_metrics


@dataclass(frozen=True)
class RunIdentity:
    """Who produced the predictions; `schedule` may only be missing for from-scratch runs.

    `external_checkpoint`: {"name", "source", "kind", "revision", "commit", "sha256", "format",
    "architecture": {...}, "check": {...}} as `openmind_bench.aggregate.collect` documents it.
    """

    dataset: str
    method: str
    architecture: str
    fold: int | str
    run: str | None = None
    schedule: str | None = None
    selection: str | None = None
    epochs: int | None = None
    low_data_n: int | None = None
    external_checkpoint: dict | None = None
    seed: int | None = None  # a run of `finetune.seeds` (name ending `__s{S}`)

    def __post_init__(self):
        for key in ("dataset", "method", "architecture"):
            if not str(getattr(self, key) or "").strip():
                raise ValueError(f"run identity: {key} is empty")
        if self.fold is None or str(self.fold).strip() == "":
            raise ValueError("run identity: fold is empty")
        if self.schedule is None and self.method != SCRATCH:
            raise ValueError(f"run identity: method {self.method!r} needs a schedule (only {SCRATCH!r} runs may omit it)")
        if self.low_data_n is not None and (isinstance(self.low_data_n, bool) or not isinstance(self.low_data_n, int)
                                            or self.low_data_n < 1):
            raise ValueError(f"run identity: low_data_n must be a positive integer, got {self.low_data_n!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"run identity: seed must be a non-negative integer, got {self.seed!r}")
        if self.external_checkpoint is not None:
            self._check_external_checkpoint()

    def _check_external_checkpoint(self) -> None:
        # The full shape is checked where the file is read (aggregate.collect); here only what would
        # make the run unattributable: no source, or a method that is not the checkpoint's name.
        ckpt = self.external_checkpoint
        if not isinstance(ckpt, dict) or not str(ckpt.get("source") or "").strip():
            raise ValueError(f"run identity: external_checkpoint must be an object with a source, got {ckpt!r}")
        if ckpt.get("name") != self.method:
            raise ValueError(f"run identity: external_checkpoint name {ckpt.get('name')!r} is not the method "
                             f"{self.method!r} (an external run's method is its checkpoint's name)")


def _clean(value):
    """JSON-safe: NaN/Inf -> None, numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def _nanmean(values) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def segmentation_document(run: RunIdentity, cases: Mapping[str, dict], nsd_tolerance_mm: float) -> dict:
    """metrics.json content from `{case_id: segmentation.case_metrics(...)}`."""
    if not cases:
        raise ValueError(f"{run.dataset}: no cases were scored")
    rows = []
    for case_id in sorted(cases):
        m = cases[case_id]
        rows.append({"case": case_id, "DSC": m["DSC"], "NSD": m["NSD"], "per_class": m["per_class"]})
    class_names = list(next(iter(cases.values()))["per_class"])
    summary = {
        "DSC": _nanmean(r["DSC"] for r in rows),
        "NSD": _nanmean(r["NSD"] for r in rows),
        "n_cases": len(rows),
        "n_cases_without_value": sum(1 for r in rows if math.isnan(r["DSC"])),
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "per_class": {name: {metric: _nanmean(r["per_class"][name][metric] for r in rows) for metric in ("DSC", "NSD")}
                      for name in class_names},
    }
    return _clean({**_identity(run), "task": "seg", "cases": rows, "summary": summary})


def classification_document(run: RunIdentity, case_ids: Sequence[str], labels: Sequence[int],
                            probabilities: np.ndarray, class_names: Sequence[str]) -> dict:
    """metrics.json content of a classification test set (labels are class indices)."""
    p = np.asarray(probabilities, dtype=float)
    if len(case_ids) != len(labels) or len(case_ids) != p.shape[0]:
        raise ValueError(f"{run.dataset}: {len(case_ids)} case ids, {len(labels)} labels, {p.shape[0]} probability rows")
    if len(set(case_ids)) != len(case_ids):
        raise ValueError(f"{run.dataset}: case ids repeat")
    summary = classification_metrics(labels, p, n_classes=len(class_names))
    summary["n_cases"] = len(case_ids)
    rows = [{"case": str(c), "label": int(y), "prediction": int(np.argmax(row)),
             "probabilities": {name: float(v) for name, v in zip(class_names, row)}}
            for c, y, row in sorted(zip(case_ids, labels, p), key=lambda t: str(t[0]))]
    return _clean({**_identity(run), "task": "cls", "classes": list(class_names), "cases": rows, "summary": summary})


def _identity(run: RunIdentity) -> dict:
    return {k: v for k, v in asdict(run).items() if v is not None}


class _SpreadsheetSafeRows:
    """A csv writer whose text cells (case ids, class names) cannot run as spreadsheet formulas."""

    def __init__(self, writer):
        self._writer = writer

    def writerow(self, row) -> None:
        self._writer.writerow([neutralise_cell(v) for v in row])


def _csv_text(doc: dict) -> str:
    out = io.StringIO()
    writer = _SpreadsheetSafeRows(csv.writer(out, lineterminator="\n"))
    if doc.get("task") == "cls":
        classes = doc["classes"]
        writer.writerow(["case", "label", "prediction", *[f"p:{c}" for c in classes]])
        for r in doc["cases"]:
            writer.writerow([r["case"], r["label"], r["prediction"], *[r["probabilities"][c] for c in classes]])
        return out.getvalue()
    classes = list(doc["cases"][0]["per_class"]) if doc["cases"] else []
    writer.writerow(["case", "DSC", "NSD", *[f"{m}:{c}" for c in classes for m in ("DSC", "NSD")]])
    blank = lambda v: "" if v is None else v  # noqa: E731 - NaN stays an empty cell, as in JSON null
    for r in doc["cases"]:
        writer.writerow([r["case"], blank(r["DSC"]), blank(r["NSD"]),
                         *[blank(r["per_class"][c][m]) for c in classes for m in ("DSC", "NSD")]])
    return out.getvalue()


def write_metrics(doc: dict, json_path: str | Path, csv_path: str | Path | None = None) -> None:
    """Write metrics.json (and the per-case CSV) atomically."""
    atomic.write_json(json_path, doc)
    if csv_path is not None:
        atomic.write_text(csv_path, _csv_text(doc))
