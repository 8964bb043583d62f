"""A registry dataset as nnU-Net sees it: raw folder, preprocessed data, `splits_final.json`.

Folders (all under `results/downstream/{dataset}/nnunet_data/`, set per job as nnU-Net's
`nnUNet_raw` / `nnUNet_preprocessed`; nothing is asked of the user):

- `raw/DatasetNNN_{name}/`: `dataset.json` and per-file links to the cases the reader accepted
  (a case it rejected, e.g. a channel missing, stays out; the split rule recorded it in
  `results/qc/rejected.tsv`). NNN is the id of the registry's `source` folder (`Dataset203_ATLAS`
  -> 203), else 999;
- `preprocessed/DatasetNNN_{name}/`: nnU-Net's fingerprint, its default plans, the data
  preprocessed at the pre-training spacing (`plans.data_identifier`), `splits_final.json`.

Preprocessing runs once per dataset and spacing, under a file lock, so concurrent fine-tuning jobs
of one dataset share it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

from openmind_bench import atomic
from openmind_bench.downstream.nnunet import plans as nnplans

log = logging.getLogger(__name__)

DATA_DIR = "nnunet_data"
FALLBACK_ID = 999


def dataset_id(spec) -> int:
    match = re.match(r"Dataset(\d{3})_", Path(spec.source).name)
    return int(match.group(1)) if match else FALLBACK_ID


def dataset_name(spec) -> str:
    return f"Dataset{dataset_id(spec):03d}_{spec.name}"


@contextlib.contextmanager
def environment(raw: str | Path | None = None, preprocessed: str | Path | None = None,
                results: str | Path | None = None, n_proc_da: int = 1):
    """nnU-Net's path variables and augmentation workers for the duration of a job step (nnunetv2
    reads them lazily, so setting them here is enough); the previous values come back afterwards."""
    values = {"nnUNet_raw": raw, "nnUNet_preprocessed": preprocessed, "nnUNet_results": results,
              "nnUNet_n_proc_DA": max(1, int(n_proc_da))}
    previous = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is not None:
                os.environ[key] = str(value)
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.is_symlink() and os.readlink(link) == str(target):
            return
        link.unlink()
    link.symlink_to(target)


def export_raw(data, raw_root: str | Path) -> Path:
    """`raw_root/DatasetNNN_{name}` with links to the accepted cases (`data`: readers.DownstreamData)."""
    spec = data.spec
    folder = Path(raw_root) / dataset_name(spec)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    source_json = json.loads((Path(spec.source) / "dataset.json").read_text())
    ending = source_json.get("file_ending", spec.file_ending)
    wanted = set()
    for case in data.cases:
        for channel, image in enumerate(case.images):
            name = f"{case.case_id}_{channel:04d}{ending}"
            _link(Path(image).resolve(), folder / "imagesTr" / name)
            wanted.add(f"imagesTr/{name}")
        _link(Path(case.label).resolve(), folder / "labelsTr" / f"{case.case_id}{ending}")
        wanted.add(f"labelsTr/{case.case_id}{ending}")
    for sub in ("imagesTr", "labelsTr"):  # cases rejected since the last export
        for path in (folder / sub).iterdir():
            if f"{sub}/{path.name}" not in wanted:
                path.unlink()
    doc = {**source_json, "numTraining": len(data.cases), "file_ending": ending}
    atomic.write_json(folder / "dataset.json", doc)
    return folder


def splits_final(split: dict) -> list[dict]:
    """nnU-Net's splits: our folds 0..k-1 as they are, then the fixed train/test split as fold k."""
    folds = [{"train": list(f["train"]), "val": list(f["val"])} for f in split.get("folds") or []]
    return folds + [{"train": list(split["train"]), "val": list(split["test"])}]


def nnunet_fold(split: dict, fold: str | int) -> int:
    """Index in `splits_final` of our fold (`test` is the last)."""
    if str(fold) == "test":
        return len(split.get("folds") or [])
    return int(fold)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare(data, split: dict, root: str | Path, *, spacing: Sequence[float], n_proc: int = 1) -> dict:
    """Raw export, fingerprint, default plans, preprocessing at `spacing` and `splits_final.json`,
    once per dataset and spacing. Returns {raw, preprocessed, dataset_name, default_plans}."""
    root = Path(root)
    raw, pre = root / "raw", root / "preprocessed"
    name = dataset_name(data.spec)
    folder = pre / name
    identifier = nnplans.data_identifier(spacing)
    cases = sorted(c.case_id for c in data.cases)
    marker = folder / f"{identifier}.done.json"
    # the split's record of each case's files (size, mtime): a label rewritten under the same case id
    # makes nnU-Net preprocess again instead of training on the old voxels
    recorded = split.get("case_files") or {}
    wanted = {"cases": cases, "spacing": [float(s) for s in spacing], "case_files": {c: recorded.get(c) for c in cases}}
    with _locked(root / ".lock"), environment(raw, pre, None, n_proc):
        done = json.loads(marker.read_text()) if marker.exists() else None
        if done != wanted:
            from nnunetv2.experiment_planning.plan_and_preprocess_api import (
                extract_fingerprint_dataset,
                plan_experiment_dataset,
            )
            from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

            export_raw(data, raw)
            n = max(1, int(n_proc))
            extract_fingerprint_dataset(dataset_id(data.spec), num_processes=n, check_dataset_integrity=True,
                                        clean=True, verbose=False, show_progress_bar=False)
            plan_experiment_dataset(dataset_id(data.spec), overwrite_target_spacing=list(spacing))
            default = json.loads((folder / "nnUNetPlans.json").read_text())
            # preprocessing reads spacing, normalisation and data identifier only: any architecture will do
            prep = nnplans.like_nnssl(default, spacing=spacing, patch_size=default["configurations"][
                nnplans.CONFIGURATION]["patch_size"], batch_size=2, architecture_entry=default["configurations"][
                nnplans.CONFIGURATION]["architecture"], channels=len(data.spec.modalities))
            prep_name = f"{nnplans.PLANS_NAME}_preprocessing_{identifier}"
            atomic.write_json(folder / f"{prep_name}.json", prep)
            DefaultPreprocessor(verbose=False).run(dataset_id(data.spec), nnplans.CONFIGURATION, prep_name, n)
            atomic.write_json(marker, wanted)
            log.info("dataset %s: nnU-Net preprocessing at %s mm done in %s", data.name, list(spacing), folder)
        atomic.write_json(folder / "splits_final.json", splits_final(split))
    return {"raw": raw, "preprocessed": pre, "dataset_name": name,
            "default_plans": json.loads((folder / "nnUNetPlans.json").read_text())}
