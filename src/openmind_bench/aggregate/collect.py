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
      "low_data_n": 20,                                 # low-data run on N training cases; optional
      "external_checkpoint": {...},                     # external checkpoint's runs only, see below
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
(method, architecture, schedule), so run properties outside that key are folded into the labels.
The pre-training selection is appended to the method ("mae [openmind_t1]") when the runs of our own
pre-trainings use more than one selection. The fine-tuning budget goes into the architecture label,
so that delta_scratch (the from-scratch row of the same architecture label) compares runs at equal
budget: the epochs when runs use more than one epoch count ("resenc_l (1000 ep)"), and the number
of training cases of every low-data run ("resenc_l (n=20)", "resenc_l (1000 ep, n=20)"), always,
since a low-data number must never pass for a full one. `low_data_n` is read from the field; files
written before it existed are read from the run name's `__n{N}` suffix. From-scratch runs without a
schedule get schedule "none". The runs of one setting over several seeds (`seed`, read from the field
or the run name's `__s{S}`) share one label; their fold column reads `{fold}/s{seed}` (`results.fold_label`),
so the table averages them like folds and the bootstrap resamples them (`bootstrap`).

External checkpoints (config `checkpoints`, issue 20). Their runs' `method` is the checkpoint's name,
their `architecture` the one their scratch baseline uses, and they carry their provenance::

    "external_checkpoint": {
      "name": "mae_openmind",                          # required, equal to "method"
      "source": "hf://AnonRes/ResEncL-OpenMind-MAE",   # required: hf://, https:// or a path
      "kind": "hf",                                    # local | hf | https; optional
      "revision": "main", "commit": "0123abcd...",     # requested / resolved (hf); optional
      "sha256": "9f86d0...",                           # of the checkpoint file; optional, 64 hex
      "format": "published repository",                # optional
      "architecture": {"class": ..., "family": ...},   # optional object
      "check": {"moved": 310, "left_new": 48, ...}     # optional object (the check.json summary)
    }

Every run may record what it trained (the fine-tuning engines write it; optional)::

    "trained_parameters": {"count": 1234, "total": 5678, "share": 0.217}

`Collected.trained` maps a row's labels to the mean share over its files (datasets differ a little:
the decoder's last layer has as many outputs as classes); the tables show it beside the score.

Every run of one method label must name the same checkpoint (the fields `PROVENANCE_FIELDS`): two
files of one checkpoint name with different sha256, say, are refused rather than averaged. Such a
label is never tagged with a selection. `Collected.external` maps the method label to the provenance
(the `PROVENANCE_FIELDS` and `architecture`); the tables mark those rows and list their sources.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from openmind_bench import atomic
from openmind_bench.aggregate.results import fold_label
from openmind_bench.names import METRICS, NO_SCHEDULE, SCRATCH, InvalidName, parse_run
from openmind_bench.spreadsheet import neutralise_frame

log = logging.getLogger(__name__)

COLUMNS = ["method", "architecture", "schedule", "dataset", "metric", "value", "fold", "case"]
PATTERN = "*/*/fold_*/metrics.json"
# What identifies an external checkpoint; every run of one method label must agree on them.
PROVENANCE_FIELDS = ("name", "source", "kind", "revision", "commit", "sha256", "format")
SOURCE_KINDS = ("local", "hf", "https")
# Columns of `Collected.runs`: the labels (RUN_KEY of the long table) and what they were made from.
RUN_COLUMNS = ["method", "architecture", "schedule", "base_method", "base_architecture", "selection", "epochs",
               "low_data_n", "external"]


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


def _low_data_n(doc: dict, run: str | None, path: Path) -> int | None:
    return _run_name_number(doc, run, path, "low_data_n", 1, "n={}")


def _seed(doc: dict, run: str | None, path: Path) -> int | None:
    return _run_name_number(doc, run, path, "seed", 0, "s{}")


def _run_name_number(doc: dict, run: str | None, path: Path, key: str, minimum: int, spelled: str) -> int | None:
    """The field `key` (an integer >= minimum), checked against the run name's (`names.RunName.{key}`,
    spelled there as `spelled`); files written before the field existed: the run name's value."""
    value = doc.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        kind = "positive" if minimum == 1 else "non-negative"
        raise CollectError(f"{path}: field '{key}' must be a {kind} integer, got {value!r}")
    try:
        from_name = getattr(parse_run(run), key) if run else None
    except InvalidName:
        from_name = None  # a run name of another shape: only quoted in messages
    if value is not None and from_name is not None and value != from_name:
        raise CollectError(f"{path}: field '{key}' is {value} but the run name {run!r} says {spelled.format(from_name)}")
    return value if value is not None else from_name


def _trained_share(value, path: Path) -> float | None:
    """The share of the network a run trained (field `trained_parameters`), or None when absent."""
    if value is None:
        return None
    share = value.get("share") if isinstance(value, dict) else None
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise CollectError(f"{path}: field 'trained_parameters' must be an object whose 'share' is a number in "
                           f"[0, 1], got {value!r}")
    return float(share)


def _external_checkpoint(value, method: str, where: str) -> dict | None:
    """The validated provenance of an external checkpoint's run, or None for our own runs; `where`
    starts every error message (the file and the field)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CollectError(f"{where} must be an object with at least 'name' and 'source', got {value!r}")
    for key in ("name", "source"):
        if not isinstance(value.get(key), str) or not value[key].strip():
            raise CollectError(f"{where}: '{key}' is missing or not a non-empty string")
    for key in PROVENANCE_FIELDS[2:]:
        if value.get(key) is not None and not isinstance(value[key], str):
            raise CollectError(f"{where}: '{key}' must be a string or null, got {value[key]!r}")
    if value.get("kind") is not None and value["kind"] not in SOURCE_KINDS:
        raise CollectError(f"{where}: 'kind' is {value['kind']!r}, expected one of {SOURCE_KINDS}")
    if value.get("sha256") is not None and not re.fullmatch(r"[0-9a-f]{64}", value["sha256"]):
        raise CollectError(f"{where}: 'sha256' {value['sha256']!r} is not 64 lower-case hexadecimal digits")
    for key in ("architecture", "check"):
        if value.get(key) is not None and not isinstance(value[key], dict):
            raise CollectError(f"{where}: '{key}' must be an object or null, got {value[key]!r}")
    if method == SCRATCH:
        raise CollectError(f"{where}: a from-scratch run ({SCRATCH!r}) has no checkpoint; an external checkpoint "
                           f"cannot be named {SCRATCH!r}")
    if value["name"].strip() != method:
        raise CollectError(f"{where}: name {value['name']!r} is not the method {method!r} "
                           "(an external run's method is its checkpoint's name)")
    return {**{key: value.get(key) for key in PROVENANCE_FIELDS}, "name": method,
            "architecture": value.get("architecture")}


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
    fields["low_data_n"] = _low_data_n(doc, fields["run"], path)
    fields["seed"] = _seed(doc, fields["run"], path)
    fields["external_checkpoint"] = _external_checkpoint(doc.get("external_checkpoint"), fields["method"],
                                                         f"{path}: field 'external_checkpoint'")
    fields["trained_share"] = _trained_share(doc.get("trained_parameters"), path)

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


@dataclass(frozen=True)
class Collected:
    """What `gather` read: the long rows, the runs behind the labels, the external checkpoints."""

    long: pd.DataFrame  # COLUMNS, sorted
    runs: pd.DataFrame  # RUN_COLUMNS, one row per labelled run (method, architecture, schedule)
    external: dict[str, dict]  # method label -> provenance (PROVENANCE_FIELDS + "architecture")
    run_labels: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # metrics.json path -> its labels
    trained: dict[tuple[str, str, str], float] = field(default_factory=dict)  # labels -> mean trained share


def gather(paths) -> Collected:
    """Read and label every metrics.json of `paths` (labels as the module doc says)."""
    paths = sorted(Path(p) for p in paths)
    if not paths:
        raise CollectError("no metrics.json files to collect")
    parsed = [(p, read_metrics_json(p)) for p in paths]
    runs = [d["run"] for _, d in parsed]
    selections = {r["selection"] for r in runs if r["method"] != SCRATCH and r["external_checkpoint"] is None}
    epochs = {r["epochs"] for r in runs}
    tag_selection = len(selections) > 1
    tag_epochs = len(epochs) > 1
    if tag_selection:
        log.info("runs use several pre-training selections %s: appended to the method label",
                 sorted(selections, key=str))
    if tag_epochs:
        log.info("runs use several epoch counts %s: appended to the architecture label", sorted(epochs, key=str))

    records, owner, labelled, run_labels, shares = [], {}, {}, {}, {}
    external, external_owner = {}, {}
    skipped = 0
    for path, doc in parsed:
        r = doc["run"]
        method = r["method"]
        if tag_selection and method != SCRATCH and r["external_checkpoint"] is None:
            method = f"{method} [{r['selection'] or 'default'}]"
        architecture = _architecture_label(r["architecture"], r["epochs"], tag_epochs, r["low_data_n"])
        _check_provenance(method, r["external_checkpoint"], path, external, external_owner)
        key = (method, architecture, r["schedule"], r["dataset"], fold_label(r["fold"], r["seed"]))
        if key in owner:
            raise CollectError(
                f"{owner[key]} and {path} both hold method {key[0]!r}, architecture {key[1]!r}, "
                f"schedule {key[2]!r}, dataset {key[3]!r}, fold {key[4]!r}"
            )
        owner[key] = path
        run_labels[str(path)] = key[:3]
        if r["trained_share"] is not None:
            shares.setdefault(key[:3], []).append(r["trained_share"])
        labelled.setdefault(key[:3], (r["method"], r["architecture"], r["selection"], r["epochs"], r["low_data_n"],
                                      r["external_checkpoint"] is not None))
        skipped += doc["skipped"]
        records += [
            (method, architecture, r["schedule"], r["dataset"], metric, value, key[4], case)
            for metric, value, case in doc["rows"]
        ]
    if skipped:
        log.info("%d per-case values were null/NaN and are left out of the means", skipped)
    long = pd.DataFrame(records, columns=COLUMNS)
    long["_metric_order"] = long.metric.map(METRICS.index)
    long = long.sort_values(["method", "architecture", "schedule", "dataset", "_metric_order", "fold", "case"],
                            kind="stable")
    long = long.drop(columns="_metric_order").reset_index(drop=True)
    run_table = pd.DataFrame([(*label, *made_of) for label, made_of in sorted(labelled.items())], columns=RUN_COLUMNS)
    return Collected(long, run_table, {label: external[label] for label in sorted(external) if external[label]},
                     run_labels, {label: sum(v) / len(v) for label, v in shares.items()})


def _architecture_label(architecture: str, epochs: str | None, tag_epochs: bool, low_data_n: int | None) -> str:
    budget = [f"{epochs or '?'} ep"] if tag_epochs else []
    if low_data_n is not None:
        budget.append(f"n={low_data_n}")
    return f"{architecture} ({', '.join(budget)})" if budget else architecture


def _check_provenance(method: str, provenance: dict | None, path: Path, seen: dict, owner: dict) -> None:
    """One method label is one checkpoint: our own runs or the same external checkpoint everywhere."""
    if method not in seen:
        seen[method], owner[method] = provenance, path
        return
    before = seen[method]
    if (before is None) != (provenance is None):
        external_file, own_file = (owner[method], path) if before is not None else (path, owner[method])
        raise CollectError(f"{external_file} holds a run of external checkpoint {method!r} but {own_file} a run "
                           f"of method {method!r} without one: rename the checkpoint or the method")
    if before is not None:
        differ = [k for k in PROVENANCE_FIELDS if before[k] != provenance[k]]
        if differ:
            raise CollectError(
                f"{owner[method]} and {path} are runs of external checkpoint {method!r} but differ in "
                + ", ".join(f"{k} ({before[k]!r} vs {provenance[k]!r})" for k in differ)
                + ": results of two checkpoints under one name; re-run or rename one"
            )


def collect(paths) -> pd.DataFrame:
    """Long results rows (see `COLUMNS`) from metrics.json files; labels as the module doc says."""
    return gather(paths).long


def external_checkpoints(paths) -> dict[str, dict]:
    """{method label: provenance} of the external checkpoints among `paths` (see the module doc)."""
    return gather(paths).external


def write_results(paths, out: str | Path, external_out: str | Path | None = None) -> Collected:
    """Collect `paths` and write RESULTS.csv to `out` (and the external checkpoints' provenance,
    `{method label: provenance}`, as JSON to `external_out` when given)."""
    collected = gather(paths)
    with atomic.atomic_path(out) as tmp:
        neutralise_frame(collected.long).to_csv(tmp, index=False)  # a CSV people open in spreadsheets
    if external_out is not None:
        atomic.write_json(external_out, collected.external)
    log.info("collected %d values from %d metrics.json files into %s", len(collected.long),
             len(set(map(str, paths))), out)
    return collected


def read_external_checkpoints(path: str | Path) -> dict[str, dict]:
    """The `{method label: provenance}` JSON that `write_results(external_out=...)` writes, checked."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CollectError(f"{path}: cannot read the external checkpoints file ({e})") from None
    if not isinstance(doc, dict):
        raise CollectError(f"{path}: the top level must be an object {{method label: provenance}}")
    # An external label is the checkpoint's name (never tagged), so the provenance's name must equal it.
    checked = {label: _external_checkpoint(value, label, f"{path}: entry {label!r}") for label, value in doc.items()}
    return {label: value for label, value in checked.items() if value is not None}
