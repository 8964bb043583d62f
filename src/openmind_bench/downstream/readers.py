"""Read downstream datasets as users already have them.

Segmentation: the nnU-Net raw format::

    Dataset{NNN}_{Name}/
      dataset.json     {"channel_names": {"0": "T1w", ...}, "labels": {"background": 0, ...},
                        "numTraining": N, "file_ending": ".nii.gz"}
      imagesTr/{case}_{0000..}{file_ending}   one file per channel
      labelsTr/{case}{file_ending}

Classification: a folder of images plus a labels table::

    Name/
      imagesTr/{case}_{0000..}{file_ending}
      labels.csv       case,label[,subject][,site]   label: class name or class index

Patient grouping comes from the registry: a `metadata` CSV (case,subject[,site]) in the dataset
folder, or a `subject_pattern` on the case id; otherwise every case is its own subject.

A dataset that cannot be read at all (folder missing, dataset.json malformed, channels or labels
contradicting the registry) raises `DatasetError` naming it; `read_datasets` collects those per
dataset and goes on with the others. A single broken case (a channel missing, an unreadable
header, grids that disagree, an image or label file truncated or corrupt: `nifti.check_image_file`)
is rejected with its reason and skipped; `checked_case_table` also rejects label images with
undeclared values (the split rule runs it, so splits hold only usable cases).

`dataset_files` lists the files the reader reads with their size and mtime: the split records them
per case (`case_file_record`) and `data_fingerprint` digests them for the split rule's params, so
a file changed after its split is noticed (splits.check_case_files, Snakemake's params trigger).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from openmind_bench.nifti import image_file_problem
from openmind_bench.registry import DatasetSpec, Registry, RegistryError
from openmind_bench.qc import Rejections

log = logging.getLogger(__name__)

DATASET_JSON_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


class DatasetError(ValueError):
    """A downstream dataset that cannot be used; the message names it."""


@dataclass(frozen=True)
class Case:
    case_id: str
    images: tuple[Path, ...]  # one per input channel, in channel order
    subject: str
    site: str = ""
    label: Path | None = None  # segmentation: the label image
    target: int | None = None  # classification: the class index


@dataclass
class DownstreamData:
    spec: DatasetSpec
    cases: list[Case]
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file or case, reason)

    @property
    def name(self) -> str:
        return self.spec.name

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(f"dataset {self.name}: no case {case_id!r}")

    def record_rejections(self, rejections: Rejections) -> None:
        """Copy the rejected cases into a QC rejection record (one row each)."""
        for item, reason in self.rejected:
            rejections.add(item, reason, dataset=self.name)


def _error(spec: DatasetSpec, message: str) -> DatasetError:
    return DatasetError(f"dataset {spec.name} ({spec.source}): {message}")


def _read_dataset_json(spec: DatasetSpec) -> dict:
    path = spec.source / "dataset.json"
    if not path.is_file():
        raise _error(spec, "dataset.json is missing (nnU-Net raw format expected)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _error(spec, f"dataset.json is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise _error(spec, "dataset.json must hold an object")
    if "channel_names" not in doc and "modality" in doc:
        doc["channel_names"] = doc["modality"]  # nnU-Net v1 name of the same field
    missing = [k for k in DATASET_JSON_KEYS if k not in doc]
    if missing:
        raise _error(spec, f"dataset.json lacks {missing} (needs {list(DATASET_JSON_KEYS)})")
    channels = doc["channel_names"]
    if not isinstance(channels, dict) or sorted(channels) != [str(i) for i in range(len(channels))]:
        raise _error(spec, f"dataset.json channel_names must map '0'..'C-1' to names, got {channels!r}")
    if len(channels) != spec.channels:
        raise _error(spec, f"dataset.json has {len(channels)} channel(s) {list(channels.values())}, "
                           f"the registry {spec.channels} {list(spec.modalities)}")
    names = [str(channels[str(i)]) for i in range(len(channels))]
    if [n.lower() for n in names] != [m.lower() for m in spec.modalities]:
        log.warning("dataset %s: dataset.json calls the channels %s, the registry %s (order taken as given)",
                    spec.name, names, list(spec.modalities))
    labels = doc["labels"]
    if not isinstance(labels, dict):
        raise _error(spec, "dataset.json labels must be a mapping of name -> value")
    normalised = {str(k): tuple(v) if isinstance(v, list) else v for k, v in labels.items()}
    if sorted(map(str, normalised.values())) != sorted(map(str, spec.labels.values())):
        raise _error(spec, f"dataset.json labels {labels} do not match the registry's {spec.labels}")
    if {k: str(v) for k, v in normalised.items()} != {k: str(v) for k, v in spec.labels.items()}:
        log.warning("dataset %s: dataset.json names the labels %s, the registry %s", spec.name, labels, spec.labels)
    ending = doc["file_ending"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise _error(spec, f"dataset.json file_ending {ending!r} must start with a dot")
    if not isinstance(doc["numTraining"], int) or doc["numTraining"] < 1:
        raise _error(spec, f"dataset.json numTraining {doc['numTraining']!r} is not a positive integer")
    return doc


def _channel_files(folder: Path, case_id: str, channels: int, ending: str) -> tuple[list[Path], list[int]]:
    files = [folder / f"{case_id}_{i:04d}{ending}" for i in range(channels)]
    return files, [i for i, f in enumerate(files) if not f.is_file()]


def _case_problem(files: Iterable[Path], verify_files: bool) -> str | None:
    """Why these files cannot be one case (unreadable header, not 3-D, grids that differ, and with
    `verify_files` a truncated or corrupt file), or None."""
    files = list(files)
    problem = _header_problem(files)
    if problem or not verify_files:
        return problem
    for f in files:
        # a header reads fine from a half-written .nii.gz; SimpleITK (nnU-Net) then fills the rest with zeros
        problem = image_file_problem(f)
        if problem:
            return problem
    return None


def _header_problem(files: Iterable[Path]) -> str | None:
    """Why these files cannot be one case (unreadable, not 3-D, grids that differ), or None."""
    import nibabel as nib

    grid = None
    for f in files:
        try:
            img = nib.load(str(f))
            shape = tuple(int(s) for s in img.shape)
            affine = np.asarray(img.affine)
        except Exception as e:  # nibabel raises many kinds for broken headers
            return f"{f.name}: unreadable header ({type(e).__name__}: {e})"
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            return f"{f.name}: not a 3-D image (shape {shape})"
        if grid is None:
            grid = (f, shape, affine)
        elif shape != grid[1] or not np.allclose(affine, grid[2], atol=1e-3):
            return f"{f.name} is not on the grid of {grid[0].name} (shape {shape} vs {grid[1]})"
    return None


def _grouping(spec: DatasetSpec, case_ids: list[str]) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str]]]:
    """case -> (subject, site), and the cases the metadata cannot place."""
    if spec.metadata:
        path = spec.source / spec.metadata
        if not path.is_file():
            raise _error(spec, f"metadata table {spec.metadata} (registry field metadata) does not exist")
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        if not {"case", "subject"} <= set(table.columns):
            raise _error(spec, f"metadata table {path.name} needs columns case,subject[,site], has {list(table.columns)}")
        if table.case.duplicated().any():
            raise _error(spec, f"metadata table {path.name} lists case(s) twice: {sorted(table.case[table.case.duplicated()])[:5]}")
        sites = table["site"] if "site" in table.columns else pd.Series([""] * len(table))
        known = {c: (s or c, site) for c, s, site in zip(table.case, table.subject, sites)}
        out = {c: known[c] for c in case_ids if c in known}
        missing = [(c, f"case not in the metadata table {path.name}") for c in case_ids if c not in known]
        return out, missing
    if spec.subject_pattern:
        pattern = re.compile(spec.subject_pattern)
        out, missing = {}, []
        for c in case_ids:
            m = pattern.search(c)
            if m and m.group("subject"):
                out[c] = (m.group("subject"), "")
            else:
                missing.append((c, f"case id does not match subject_pattern {spec.subject_pattern!r}"))
        return out, missing
    return {c: (c, "") for c in case_ids}, []


def _read_segmentation(spec: DatasetSpec, check_headers: bool, verify_files: bool) -> DownstreamData:
    doc = _read_dataset_json(spec)
    ending = doc["file_ending"]
    images, labels = spec.source / "imagesTr", spec.source / "labelsTr"
    for folder in (images, labels):
        if not folder.is_dir():
            raise _error(spec, f"folder {folder.name}/ is missing")
    label_files = sorted(p for p in labels.iterdir() if p.name.endswith(ending) and not p.name.startswith("."))
    case_ids = [p.name[: -len(ending)] for p in label_files]
    rejected: list[tuple[str, str]] = []
    channel_pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    image_cases = {m.group("case") for p in images.iterdir() if (m := channel_pattern.match(p.name))}
    for orphan in sorted(image_cases - set(case_ids)):
        rejected.append((str(images / f"{orphan}_0000{ending}"), "image without a label file in labelsTr"))
    if doc["numTraining"] != len(case_ids):
        log.warning("dataset %s: dataset.json numTraining is %d, labelsTr holds %d case(s)",
                    spec.name, doc["numTraining"], len(case_ids))
    groups, ungrouped = _grouping(spec, case_ids)
    rejected += [(str(labels / f"{c}{ending}"), reason) for c, reason in ungrouped]
    cases = []
    for case_id, label in zip(case_ids, label_files):
        if case_id not in groups:
            continue
        files, missing = _channel_files(images, case_id, spec.channels, ending)
        if missing:
            rejected.append((str(label), f"channel(s) {missing} missing in imagesTr"))
            continue
        if check_headers:
            problem = _case_problem([*files, label], verify_files)
            if problem:
                rejected.append((str(label), problem))
                continue
        subject, site = groups[case_id]
        cases.append(Case(case_id, tuple(files), subject, site, label=label))
    return DownstreamData(spec, cases, rejected)


def _read_classification(spec: DatasetSpec, check_headers: bool, verify_files: bool) -> DownstreamData:
    table_path = spec.source / spec.labels_csv
    if not table_path.is_file():
        raise _error(spec, f"labels table {spec.labels_csv} is missing")
    try:
        table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise _error(spec, f"labels table {spec.labels_csv} cannot be read as CSV: {e}") from None
    if not {"case", "label"} <= set(table.columns):
        raise _error(spec, f"labels table {spec.labels_csv} needs columns case,label[,subject][,site], "
                           f"has {list(table.columns)}")
    if (table.case == "").any():
        raise _error(spec, f"labels table {spec.labels_csv} has rows without a case id")
    dup = sorted(set(table.case[table.case.duplicated()]))
    if dup:
        raise _error(spec, f"labels table {spec.labels_csv} lists case(s) twice: {dup[:5]}")
    images = spec.source / spec.images_dir
    if not images.is_dir():
        raise _error(spec, f"image folder {spec.images_dir}/ is missing")
    by_name = {k.lower(): v for k, v in spec.labels.items()}
    groups, ungrouped = _grouping(spec, list(table.case)) if spec.metadata or spec.subject_pattern else ({}, [])
    rejected = [(c, reason) for c, reason in ungrouped]
    cases = []
    for _, row in table.iterrows():
        case_id, raw = row.case, row.label.strip()
        if raw.lower() in by_name:
            target = by_name[raw.lower()]
        elif raw.isdigit() and int(raw) in spec.labels.values():
            target = int(raw)
        else:
            rejected.append((case_id, f"label {raw!r} is not one of {spec.class_names} (or their indices)"))
            continue
        files, missing = _channel_files(images, case_id, spec.channels, spec.file_ending)
        if missing:
            rejected.append((case_id, f"channel(s) {missing} missing in {spec.images_dir}/"))
            continue
        if check_headers:
            problem = _case_problem(files, verify_files)
            if problem:
                rejected.append((case_id, problem))
                continue
        if spec.metadata or spec.subject_pattern:
            if case_id not in groups:
                continue
            subject, site = groups[case_id]
        else:
            subject = row.get("subject", "") or case_id
            site = row.get("site", "")
        cases.append(Case(case_id, tuple(files), subject, site, target=target))
    orphans = sorted({m.group("case") for p in images.iterdir()
                      if (m := re.match(r"^(?P<case>.+)_\d{4}" + re.escape(spec.file_ending) + "$", p.name))}
                     - set(table.case))
    rejected += [(str(images / f"{c}_0000{spec.file_ending}"), f"image without a row in {spec.labels_csv}")
                 for c in orphans]
    return DownstreamData(spec, cases, rejected)


def declared_label_values(spec: DatasetSpec) -> set[int]:
    """Every voxel value a label image may hold: background and the registry's labels (a region
    label's member values included)."""
    values = {0}
    for value in spec.labels.values():
        values.update(int(v) for v in (value if isinstance(value, (tuple, list)) else [value]))
    return values


def _label_counts(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(values, voxel counts, ml per voxel) of one label image, read once."""
    import nibabel as nib

    img = nib.load(str(path))
    seg = np.asarray(img.dataobj)
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    if np.issubdtype(seg.dtype, np.integer) and (seg.size == 0 or seg.min() >= 0):
        counts = np.bincount(seg.ravel())  # linear time where np.unique would sort
        values = np.flatnonzero(counts)
        return values, counts[values], voxel_ml
    values, counts = np.unique(seg, return_counts=True)
    return values, counts, voxel_ml


def _label_problem(name: str, values: np.ndarray, allowed: set[int]) -> str | None:
    """Why a label image with these values cannot be used (non-integer values, values outside
    `allowed`), or None."""
    if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
        odd = [float(v) for v in values if not np.isfinite(v) or v != np.round(v)][:5]
        return f"{name}: label image holds non-integer values {odd}"
    outside = sorted(int(v) for v in values if int(v) not in allowed)
    if outside:
        return f"{name}: label value(s) {outside} outside the declared {sorted(allowed)}"
    return None


def _volume_columns(spec: DatasetSpec, values: np.ndarray, counts: np.ndarray, voxel_ml: float) -> dict:
    """`present:<label>` and `volume_ml:<label>` per foreground label (a region: its values summed)."""
    by_value = dict(zip(values.tolist(), counts.tolist()))
    out = {}
    for name, value in spec.foreground.items():
        n = int(sum(by_value.get(v, 0) for v in (value if isinstance(value, tuple) else (value,))))
        out[f"present:{name}"] = int(n > 0)
        out[f"volume_ml:{name}"] = n * voxel_ml
    return out


def checked_case_table(data: DownstreamData) -> tuple[DownstreamData, pd.DataFrame]:
    """`case_table` for a new split, reading each label image once: segmentation cases whose label
    image holds undeclared or non-integer values are left out, added to the rejections (the split
    rule's job: splits hold only usable cases). Returns (the usable data, its table)."""
    if data.spec.task != "seg":
        return data, case_table(data)
    allowed = declared_label_values(data.spec)
    cases, rejected, rows = [], list(data.rejected), []
    for case in data.cases:
        try:
            values, counts, voxel_ml = _label_counts(case.label)
        except Exception as e:  # nibabel raises many kinds for broken data; one case never fails the split
            problem = f"{case.label.name}: unreadable label data ({type(e).__name__}: {e})"
        else:
            problem = _label_problem(case.label.name, values, allowed)
        if problem:
            log.warning("dataset %s: rejected %s: %s", data.name, case.label, problem)
            rejected.append((str(case.label), problem))
            continue
        cases.append(case)
        rows.append({**_case_columns(case), **_volume_columns(data.spec, values, counts, voxel_ml)})
    if not cases:
        raise _error(data.spec, f"no usable case ({len(rejected)} rejected, first: {rejected[0][1]})")
    return DownstreamData(data.spec, cases, rejected), pd.DataFrame(rows)


def restricted_to(data: DownstreamData, case_ids) -> DownstreamData:
    """`data` with only the cases `case_ids` names (e.g. those of a split)."""
    wanted = set(case_ids)
    return DownstreamData(data.spec, [c for c in data.cases if c.case_id in wanted], list(data.rejected))


def read_dataset(spec: DatasetSpec, check_headers: bool = True, verify_files: bool = True) -> DownstreamData:
    """One dataset's usable cases (and its rejected ones); raises DatasetError if none can be used.
    `verify_files`: also stream every image and label file through `nifti.check_image_file` (the
    split rule and `downstream-check`; fine-tuning jobs instead check the files against the split's
    record, `splits.check_case_files`, which costs a stat per file)."""
    if not spec.source.is_dir():
        raise _error(spec, "source folder does not exist (registry field source, under the downstream root)")
    reader = _read_segmentation if spec.task == "seg" else _read_classification
    data = reader(spec, check_headers, verify_files)
    for item, reason in data.rejected:
        log.warning("dataset %s: rejected %s: %s", spec.name, item, reason)
    if not data.cases:
        raise _error(spec, f"no usable case ({len(data.rejected)} rejected"
                           + (f", first: {data.rejected[0][1]}" if data.rejected else "") + ")")
    return data


def read_datasets(registry: Registry, names: Iterable[str] | None = None,
                  check_headers: bool = True) -> tuple[dict[str, DownstreamData], dict[str, str]]:
    """Every requested dataset that can be read, and an error message for each one that cannot."""
    names = list(names) if names is not None else list(registry.datasets) + list(registry.errors)
    data, errors = {}, {}
    for name in names:
        try:
            data[name] = read_dataset(registry.get(name), check_headers=check_headers)
        except (RegistryError, DatasetError, OSError) as e:
            errors[name] = str(e)
            log.error("%s", e)
    return data, errors


def _table_files(spec: DatasetSpec) -> list[str]:
    """The dataset's table files the reader reads (relative to its folder)."""
    tables = ["dataset.json"] if spec.task == "seg" else [spec.labels_csv]
    return tables + ([spec.metadata] if spec.metadata else [])


def dataset_files(spec: DatasetSpec) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file the reader reads: the image and label
    folders' files and the tables (dataset.json / labels table, metadata). Files missing now are
    left out; a missing folder gives an empty listing."""
    source = Path(spec.source)
    folders = ["imagesTr", "labelsTr"] if spec.task == "seg" else [spec.images_dir]
    out = {}
    for folder in folders:
        try:
            entries = list(os.scandir(source / folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            st = entry.stat()
            out[f"{folder}/{entry.name}"] = (st.st_size, st.st_mtime_ns)
    for name in _table_files(spec):
        try:
            st = (source / name).stat()
        except OSError:
            continue
        out[name] = (st.st_size, st.st_mtime_ns)
    return dict(sorted(out.items()))


def data_fingerprint(spec: DatasetSpec) -> str:
    """A short stable digest of `dataset_files`: it changes when any file the reader reads is
    added, removed, rewritten or touched, and only then."""
    digest = hashlib.sha256()
    for name, (size, mtime_ns) in dataset_files(spec).items():
        digest.update(f"{name}\t{size}\t{mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def case_file_record(data: DownstreamData, files: dict[str, tuple[int, int]]) -> dict:
    """What a split records of the files under it: {"case_files": {case: {path: [size, mtime_ns]}},
    "dataset_files": {table: [size, mtime_ns]}}, paths relative to the dataset folder; `files` as
    `dataset_files`, listed before the cases were checked (a file rewritten during the checks then
    no longer matches the record). A file not in `files` (created since) is stat'ed now."""
    source = Path(data.spec.source)

    def entry(path: Path) -> tuple[str, list[int]]:
        name = path.relative_to(source).as_posix() if path.is_relative_to(source) else str(path)
        if name not in files:
            st = path.stat()
            return name, [st.st_size, st.st_mtime_ns]
        return name, list(files[name])

    cases = {c.case_id: dict(entry(Path(p)) for p in [*c.images, *([c.label] if c.label else [])])
             for c in data.cases}
    tables = {name: list(files[name]) for name in _table_files(data.spec) if name in files}
    return {"case_files": cases, "dataset_files": tables}


def _case_columns(case: Case) -> dict:
    return {"case": case.case_id, "subject": case.subject, "site": case.site}


def case_table(data: DownstreamData, volumes: bool = True) -> pd.DataFrame:
    """One row per case: case, subject, site and what splits balance.

    Segmentation adds, per foreground label, `present:<label>` (0/1) and `volume_ml:<label>` (read
    from the label images when `volumes`); classification adds `label` (the class index).
    """
    rows = []
    for c in data.cases:
        row = _case_columns(c)
        if data.spec.task == "cls":
            row["label"] = c.target
        elif volumes:
            row.update(_volume_columns(data.spec, *_label_counts(c.label)))
        rows.append(row)
    return pd.DataFrame(rows)
