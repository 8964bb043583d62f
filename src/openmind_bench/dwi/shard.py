"""One (dataset, shard) of the index through the DWI stage: the Snakemake job `dwi_shard`.

Writes, per scan, a BIDS derivatives tree under `{deriv_root}/{dataset}/`:
  sub-X[/ses-Y]/dwi/<scan entities>_desc-T2w_dwimap.nii.gz   mean b0 (T2-weighted)
                   /<scan entities>_desc-ADC_dwimap.nii.gz   mean diffusivity, mm^2/s
                   /<scan entities>_desc-FA_dwimap.nii.gz    fractional anisotropy
                   /<scan entities>_desc-brain_mask.nii.gz   the brain mask the maps are cut to
each with a JSON sidecar (Sources, the steps run). BIDS 1.10 has no suffix for diffusion-model maps
yet (BEP016 proposes `dwimap`), so each dataset's `.bidsignore` lists `*_dwimap.*`; everything else
is validated. Also writes the shard's derived-image table (the columns of
results/index/images.parquet, modality T2w/ADC/FA, `derived_from` = source image id, same shard as
the source), its status table (image, step, seconds, outcome) and its rejection part.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from openmind_bench import __version__, atomic
from openmind_bench.bids.index import COLUMNS, concat_image_tables, conform
from openmind_bench.dwi.derive import DwiSettings, derive_scan
from openmind_bench.dwi.gradients import DwiRejected
from openmind_bench.qc import Rejections
from openmind_bench import sharding
from openmind_bench.sharding import NotRemade, image_id, read_shard, source_row  # noqa: F401 (NotRemade: this stage's error)

log = logging.getLogger(__name__)

STAGE = "dwi"
MAPS = {"T2w": "t2w", "ADC": "adc", "FA": "fa"}  # modality (the release's names) -> DerivedScan field
STATUS_COLUMNS = ["image_id", "dataset", "shard", "step", "seconds", "outcome"]
BIDSIGNORE = "*_dwimap.nii.gz\n*_dwimap.json\n"


def dataset_description(dataset: str, settings: DwiSettings) -> dict:
    return {
        "Name": f"DWI-derived T2w, ADC and FA maps of {dataset}",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "openmind-bench dwi",
            "Version": __version__,
            "Description": f"backend {settings.backend}; denoise {settings.denoise}, degibbs {settings.degibbs}, "
                           f"motion {settings.motion}, N4 {settings.bias}, mask {settings.mask}",
        }],
        "SourceDatasets": [{"URL": f"https://openneuro.org/datasets/{dataset}"}],
    }


def write_dataset_files(root: str | Path, dataset: str, settings: DwiSettings) -> Path:
    """dataset_description.json and .bidsignore of one dataset's derivatives tree; returns the description."""
    root = Path(root) / dataset
    atomic.write_text(root / ".bidsignore", BIDSIGNORE)
    atomic.write_json(root / "dataset_description.json", dataset_description(dataset, settings))
    return root / "dataset_description.json"


def shard_rows(index: str | Path, dataset: str, shard: int) -> pd.DataFrame:
    """The DWI rows of one (dataset, shard) of the index (read with a row filter)."""
    return read_shard([index], dataset, shard, modality="DWI")


def _save(array: np.ndarray, affine: np.ndarray, path: Path, dtype) -> None:
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic.atomic_path(path) as tmp:
        nib.save(img, str(tmp.with_name(tmp.name + ".nii.gz")))
        tmp.with_name(tmp.name + ".nii.gz").rename(tmp)


def _stem(source_path: str) -> str:
    name = Path(source_path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name.removesuffix("_dwi")


def _rel_folder(row) -> str:
    folder = f"sub-{row.subject}" + (f"/ses-{row.session}" if row.session else "")
    return f"{folder}/dwi"


def scan_outputs(row, result, dataset: str, root: Path, settings: DwiSettings, columns) -> tuple[dict, list[dict]]:
    """The files of one derived scan ({path: function that writes it}, brain mask first) and its
    derived-image records (the index's columns)."""
    writes = {}
    records = []
    folder = root / _rel_folder(row)
    stem = _stem(row.path)
    source_uri = f"bids:raw:{_rel_folder(row)}/{Path(row.path).name}"
    mask_path = folder / f"{stem}_desc-brain_mask.nii.gz"
    writes[mask_path] = lambda: _save(result.mask.astype(np.uint8), result.affine, mask_path, np.uint8)
    mask_sidecar = mask_path.with_name(mask_path.name.replace(".nii.gz", ".json"))
    writes[mask_sidecar] = lambda: atomic.write_json(mask_sidecar, {"Type": "Brain", "Sources": [source_uri],
                                                                    "SkullStripped": False})
    for modality, attr in MAPS.items():
        array = getattr(result, attr)
        if array is None:
            continue
        path = folder / f"{stem}_desc-{modality}_dwimap.nii.gz"
        writes[path] = lambda array=array, path=path: _save(array, result.affine, path, np.float32)
        sidecar = {"Description": {"T2w": "mean of the b0 volumes", "ADC": "mean diffusivity (tensor), mm^2/s",
                                   "FA": "fractional anisotropy (tensor)"}[modality],
                   "Units": "mm^2/s" if modality == "ADC" else "arbitrary",
                   "SkullStripped": True, "Sources": [source_uri],
                   "Steps": result.status, "Notes": result.notes, "Settings": settings.describe()}
        sidecar_path = path.with_name(path.name.replace(".nii.gz", ".json"))
        writes[sidecar_path] = lambda p=sidecar_path, v=sidecar: atomic.write_json(p, v)
        rel = path.relative_to(root).as_posix()
        entities = dict(json.loads(row.entities or "{}"), desc=modality)
        records.append({
            **{c: getattr(row, c) for c in COLUMNS if c in columns},
            "image_id": image_id(dataset, rel),
            "suffix": "dwimap",
            "modality": modality,
            "entities": json.dumps(entities, sort_keys=True),
            "path": path.as_posix(),
            "derived_from": row.image_id,
            "bval": "", "bvec": "", "n_volumes": 1,
            "shape": "x".join(str(s) for s in array.shape),
            "anat_mask": mask_path.as_posix(), "anon_mask": "",
            "quality_score": math.nan,
        })
    return writes, records


def run_dwi_shard(index: str | Path, dataset: str, shard: int, deriv_root: str | Path, table_path: str | Path,
                  status_path: str | Path, rejected_path: str | Path, settings: DwiSettings,
                  scratch: str | Path | None = None) -> pd.DataFrame:
    """Derive every DWI scan of the shard; returns (and writes) the derived-image table."""
    rows = shard_rows(index, dataset, shard)
    root = Path(deriv_root) / dataset
    if len(rows):
        write_dataset_files(deriv_root, dataset, settings)
    rejections = Rejections(STAGE)
    derived, status = [], []
    started = time.perf_counter()
    for row in rows.itertuples(index=False):
        try:
            result = derive_scan(row.path, row.bval or None, row.bvec or None, settings, scratch)
        except DwiRejected as e:
            log.warning("%s: rejected at %s: %s", row.image_id, e.step, e.reason)
            rejections.add(row.image_id, f"{e.step}: {e.reason}", dataset)
            status.append({"image_id": row.image_id, "step": e.step, "seconds": 0.0, "outcome": f"rejected: {e.reason}"})
            continue
        status += [dict(s, image_id=row.image_id) for s in result.status]
        writes, records = scan_outputs(row, result, dataset, root, settings, rows.columns)
        for write in writes.values():
            write()
        derived += records
        log.info("%s: %s (%s)", row.image_id, ", ".join(m for m, a in MAPS.items() if getattr(result, a) is not None),
                 "; ".join(result.notes) or "clean")
    table = conform(derived)
    atomic.write_parquet(table_path, table)
    status_frame = pd.DataFrame(status, columns=[c for c in STATUS_COLUMNS if c not in ("dataset", "shard")])
    status_frame.insert(1, "dataset", dataset)
    status_frame.insert(2, "shard", int(shard))
    atomic.write_tsv(status_path, status_frame[STATUS_COLUMNS])
    rejections.write(rejected_path)
    log.info("%s shard %s: %d scans -> %d maps, %d rejected in %.1f s", dataset, shard, len(rows), len(table),
             len(rejections), time.perf_counter() - started)
    return table


def gather(tables: Sequence[str | Path], out: str | Path) -> pd.DataFrame:
    """Concatenate the shard tables into results/index/dwi.parquet (the derived images' index)."""
    images = concat_image_tables(tables, "derived image ids")
    atomic.write_parquet(out, images[list(COLUMNS)])
    return images


def rerun_shard_hint(table_path: str | Path) -> str:
    return sharding.rerun_shard_hint(table_path, "dwi_shard")


def _sidecar(nifti: str) -> str:
    return nifti[: -len(".nii.gz")] + ".json"


def listed_files(table: pd.DataFrame) -> list[str]:
    """Every file of the shard table's derived scans: maps, brain masks and their sidecars."""
    niftis = sorted({*table.path.astype(str), *table.anat_mask.astype(str)})
    return [f for n in niftis for f in (n, _sidecar(n))]


def missing_outputs(tables: Sequence[str | Path]) -> list[str]:
    """The derived files the given shard tables list that do not exist (deleted after their shard ran)."""
    import os

    out = []
    for t in tables:
        out += [p for p in listed_files(pd.read_parquet(t, columns=["path", "anat_mask"])) if not os.path.exists(p)]
    return out


def remake_file(index: str | Path, table_path: str | Path, dataset: str, path: str | Path, settings: DwiSettings,
                scratch: str | Path | None = None) -> None:
    """Re-make one derived file of a scan its shard derived (rule `dwi_file`): the scan is derived again
    and only that file written; a map's shape is checked against the shard table first. The JSON
    sidecars record the steps' seconds, so a re-made sidecar differs from the deleted one there.

    NotRemade when the shard table does not list the file (the scan was rejected) or the re-made map
    differs from the table: the message names the shard command that re-makes it.
    """
    target = Path(path).as_posix()
    nifti = target[: -len(".json")] + ".nii.gz" if target.endswith(".json") else target
    table = pd.read_parquet(table_path)
    hit = table[(table.path == nifti) | (table.anat_mask == nifti)]
    if hit.empty:
        raise NotRemade(f"{target}: {table_path} lists no derived scan with this file (the scan was rejected, "
                        f"see results/qc/rejected.tsv), so no job makes it; to run its shard again: "
                        f"{rerun_shard_hint(table_path)}")
    listed = hit.iloc[0]
    rows = shard_rows(index, dataset, int(listed["shard"]))
    row = source_row(rows, listed["derived_from"], target, index, rerun_shard_hint(table_path))
    result = derive_scan(row.path, row.bval or None, row.bvec or None, settings, scratch)
    root = Path(target).parents[len(Path(_rel_folder(row)).parts)]  # {deriv_root}/{dataset}
    writes, records = scan_outputs(row, result, dataset, root, settings, rows.columns)
    made = {r["path"]: r["shape"] for r in records}
    differs = [f"{p}: shape {made.get(p)} (table: {s})" for p, s in zip(table.path, table["shape"])
               if p in set(hit.path) and made.get(p) != s]
    write = writes.get(Path(target))
    if write is None or differs:
        raise NotRemade(f"{target}: deriving {row.image_id} again does not give what {table_path} records "
                        f"({'; '.join(differs) or 'the file is not among its outputs'}); the shard's inputs or "
                        f"settings changed since it ran; run the shard again: {rerun_shard_hint(table_path)}")
    write()
    log.info("%s: re-made as %s records it", target, table_path)
