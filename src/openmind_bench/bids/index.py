"""Per-dataset image index: one row per image with entities, companions and harmonised metadata.

Reads only what the fetch manifest lists, headers only by default (`verify_data` reads the
voxels too). A broken file is recorded in the rejection part and skipped; the index goes on.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from openmind_bench.bids_names import MODALITY_OF_SUFFIX, NIFTI_EXTENSIONS, datatype_of, parse_name
from openmind_bench.bids.sidecars import SidecarIndex
from openmind_bench.metadata import harmonise
from openmind_bench.nifti import data_size_problem, image_file_problem, memory_problem
from openmind_bench.qc import Rejections
from openmind_bench.sharding import image_id, shard_of
from openmind_bench.download_manifest import Manifest, snapshot_from_description

log = logging.getLogger(__name__)

# Column order and dtypes of results/index/images.parquet: every per-dataset table has exactly
# these, so an empty dataset concatenates cleanly and readers can rely on them.
COLUMNS = {
    "image_id": "string", "dataset": "string", "shard": "int64", "subject": "string",
    "session": "string", "datatype": "string", "suffix": "string", "modality": "string",
    "entities": "string", "path": "string", "derived_from": "string", "bval": "string",
    "bvec": "string", "n_volumes": "int64", "shape": "string", "voxel_size": "string",
    "voxel_x": "float64", "voxel_y": "float64", "voxel_z": "float64", "orientation": "string",
    "age": "float64", "sex": "string", "handedness": "string", "health_status": "string",
    "diagnosis": "string", "manufacturer": "string", "model": "string",
    "field_strength": "float64", "repetition_time": "float64", "echo_time": "float64",
    "inversion_time": "float64", "flip_angle": "float64", "phase_encoding_direction": "string",
    "dataset_doi": "string", "dataset_version": "string", "anat_mask": "string",
    "anon_mask": "string", "quality_score": "float64", "sidecar": "string",
}


# Written by sources that bring masks and quality scores along (the OpenMind release):
# columns path, anat_mask, anon_mask (dataset-relative), quality_score and optionally derived_from.
RELEASE_TABLE = "openmind_release.tsv"


def release_extras(raw_dir: Path) -> dict[str, dict]:
    table = pd.read_csv(raw_dir / RELEASE_TABLE, sep="\t", dtype=str, keep_default_na=False)
    out = {}
    for row in table.itertuples(index=False):
        out[row.path] = {
            "anat_mask": (raw_dir / row.anat_mask).as_posix() if row.anat_mask else "",
            "anon_mask": (raw_dir / row.anon_mask).as_posix() if row.anon_mask else "",
            "quality_score": float(row.quality_score) if row.quality_score else math.nan,
            # image id of the DWI a derived map was computed from, where the release says
            "derived_from": getattr(row, "derived_from", "") or "",
        }
    return out


def empty_index() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})


def conform(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(COLUMNS)) if rows else empty_index()
    for column, dtype in COLUMNS.items():
        if dtype == "string":
            frame[column] = frame[column].astype("string").fillna("")
        elif dtype == "int64":
            frame[column] = frame[column].fillna(-1).astype("int64")
        else:
            frame[column] = frame[column].astype("float64")
    return frame


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_json(path: Path, rejections: Rejections, dataset: str, rel: str) -> dict:
    text = _read_text(path)
    if text is None:
        return {}
    try:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    except ValueError as e:
        rejections.add(f"{dataset}/{rel}", f"malformed JSON: {e}", dataset)
        return {}


def _count_values(path: Path) -> list[int]:
    """Number of entries per row of a bval/bvec file (whitespace separated)."""
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [len(r) for r in rows]


def check_dwi_companions(bval: Path, bvec: Path, n_volumes: int) -> str | None:
    """Why a DWI's gradient table does not fit its image, or None."""
    try:
        bval_counts = _count_values(bval)
        bvec_counts = _count_values(bvec)
        np.loadtxt(bval, ndmin=1)
        np.loadtxt(bvec, ndmin=2)
    except (OSError, ValueError) as e:
        return f"unreadable gradient table: {e}"
    # one row (BIDS) or one column of b-values; 3 rows (BIDS) or N rows of 3 (seen on OpenNeuro):
    # the DWI stage reads both layouts
    if sum(bval_counts) != n_volumes or (len(bval_counts) != 1 and set(bval_counts) != {1}):
        return f"bval has {bval_counts} values for {n_volumes} volumes"
    rows_ok = len(bvec_counts) == 3 and all(c == n_volumes for c in bvec_counts)
    columns_ok = len(bvec_counts) == n_volumes and all(c == 3 for c in bvec_counts)
    if not (rows_ok or columns_ok):
        return f"bvec rows {bvec_counts} do not match 3 x {n_volumes} volumes"
    return None


def read_header(path: Path, verify_data: bool) -> tuple[dict, str | None]:
    """Geometry from the NIfTI header and, optionally, a full read; (fields, problem)."""
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        affine = img.affine
    except Exception as e:  # nibabel raises many types for a broken header/gzip
        return {}, f"unreadable NIfTI: {type(e).__name__}: {e}"
    if len(shape) not in (3, 4) and not (len(shape) == 5 and shape[3] == 1):
        return {}, f"expected a 3D or 4D image, got shape {shape}"
    if any(s < 2 for s in shape[:3]):
        return {}, f"degenerate spatial shape {shape}"
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        return {}, "non-finite or singular affine"
    if any(not math.isfinite(z) or z <= 0 for z in zooms):
        return {}, f"invalid voxel size {zooms}"
    size_problem = data_size_problem(path, img)
    if size_problem:
        return {}, size_problem
    if verify_data:
        try:
            data = np.asanyarray(img.dataobj)
        except MemoryError as e:
            return {}, memory_problem(img, e)
        except Exception as e:
            return {}, f"unreadable voxel data: {type(e).__name__}: {e}"
        if not np.all(np.isfinite(data)):
            return {}, "voxel data contain NaN or Inf"
        if float(data.max()) == float(data.min()):
            return {}, "voxel data are constant"
        # nibabel stops at the last voxel: a bad CRC-32 or length trailer is seen by a full pass only
        file_problem = image_file_problem(path)
        if file_problem:
            return {}, file_problem
    fields = {
        "n_volumes": shape[3] if len(shape) >= 4 else 1,
        "shape": "x".join(str(s) for s in shape),
        "voxel_size": "x".join(f"{z:.4g}" for z in zooms),
        "voxel_x": zooms[0], "voxel_y": zooms[1], "voxel_z": zooms[2],
        "orientation": "".join(nib.aff2axcodes(affine)),
    }
    return fields, None


def index_dataset(
    dataset: str,
    raw_dir: str | Path,
    manifest: Manifest,
    n_shards: int,
    modalities: list[str],
    rejections: Rejections,
    verify_data: bool = False,
    skip_parts: tuple[str, ...] = ("phase", "imag", "real"),
) -> pd.DataFrame:
    raw_dir = Path(raw_dir)
    relpaths = [f.path for f in manifest.files]
    sidecars = SidecarIndex(raw_dir, relpaths)
    description = _read_json(raw_dir / "dataset_description.json", rejections, dataset, "dataset_description.json")
    version, doi = snapshot_from_description(description)

    participants: dict[str, dict] = {}
    if "participants.tsv" in relpaths:
        info = _read_json(raw_dir / "participants.json", rejections, dataset, "participants.json") \
            if "participants.json" in relpaths else {}
        problems: list[str] = []
        try:
            participants = harmonise.participants_table(_read_text(raw_dir / "participants.tsv"), info, problems)
        except Exception as e:
            rejections.add(f"{dataset}/participants.tsv", f"malformed participants.tsv: {e}", dataset)
        for problem in problems:  # recorded, the images stay indexed
            log.warning("%s/participants.tsv: %s", dataset, problem)
            rejections.add(f"{dataset}/participants.tsv", problem, dataset)

    session_age: dict[tuple[str, str], float] = {}
    for rel in relpaths:
        if rel.endswith("_sessions.tsv"):
            subject = rel.split("/")[0].removeprefix("sub-")
            json_rel = rel[: -len(".tsv")] + ".json"
            info = _read_json(raw_dir / json_rel, rejections, dataset, json_rel) if json_rel in relpaths else {}
            try:
                for ses, age in harmonise.session_ages(_read_text(raw_dir / rel) or "", info).items():
                    session_age[(subject, ses)] = age
            except Exception as e:
                rejections.add(f"{dataset}/{rel}", f"malformed sessions file: {e}", dataset)

    extras = release_extras(raw_dir) if RELEASE_TABLE in relpaths else {}

    rows = []
    skipped: dict[str, int] = {}
    for rel in relpaths:
        if not rel.endswith(NIFTI_EXTENSIONS):
            continue
        label = f"{dataset}/{rel}"
        name = parse_name(rel)
        if name is None or not name.subject:
            rejections.add(label, "file name does not follow BIDS (key-value entities + suffix)", dataset)
            continue
        modality = MODALITY_OF_SUFFIX.get(name.suffix)
        if modality is None or modality not in modalities or name.entities.get("part") in skip_parts:
            skipped[name.suffix] = skipped.get(name.suffix, 0) + 1
            continue
        geometry, problem = read_header(raw_dir / rel, verify_data)
        if problem:
            rejections.add(label, problem, dataset)
            continue
        bval = bvec = ""
        if modality == "DWI":
            # nearest applicable table, beside the scan or inherited from a subject/session/dataset
            # level `dwi.bval` / `acq-X_dwi.bvec` (BIDS inheritance, as for JSON sidecars)
            bval = sidecars.companion(rel, name, ".bval") or ""
            bvec = sidecars.companion(rel, name, ".bvec") or ""
            if not bval or not bvec:
                rejections.add(label, "DWI without .bval/.bvec", dataset)
                continue
            problem = check_dwi_companions(raw_dir / bval, raw_dir / bvec, geometry["n_volumes"])
            if problem:
                rejections.add(label, problem, dataset)
                continue
        elif geometry["n_volumes"] > 1:
            # OpenMind keeps 3D anatomy only; a 4D anatomical series is not one image
            rejections.add(label, f"anatomical image is 4D ({geometry['shape']})", dataset)
            continue
        sidecar, problems = sidecars.metadata(rel, name)
        for sidecar_rel, why in problems:
            rejections.add(f"{dataset}/{sidecar_rel}", why, dataset)
        person = dict(participants.get(name.subject, {}))
        if (name.subject, name.session) in session_age and not math.isnan(session_age[(name.subject, name.session)]):
            person["age"] = session_age[(name.subject, name.session)]
        iid = image_id(dataset, rel)
        rows.append(
            {
                "image_id": iid,
                "dataset": dataset,
                "shard": shard_of(iid, n_shards),
                "subject": name.subject,
                "session": name.session,
                "datatype": datatype_of(rel),
                "suffix": name.suffix,
                "modality": modality,
                "entities": json.dumps(name.entities, sort_keys=True),
                "path": (raw_dir / rel).as_posix(),
                "derived_from": "",  # release rows overwrite it through `extras` below
                "bval": (raw_dir / bval).as_posix() if bval else "",
                "bvec": (raw_dir / bvec).as_posix() if bvec else "",
                **geometry,
                "age": person.get("age", math.nan),
                "sex": person.get("sex", "unknown"),
                "handedness": person.get("handedness", "unknown"),
                "health_status": person.get("health_status", "unknown"),
                "diagnosis": person.get("diagnosis", ""),
                **harmonise.acquisition_fields(sidecar),
                "dataset_doi": doi or "",
                "dataset_version": version or "",
                **extras.get(rel, {}),
                "sidecar": json.dumps(sidecar, sort_keys=True, default=str),
            }
        )
    if skipped:
        log.info("%s: not indexed (suffix not selected): %s", dataset, skipped)
    log.info("%s: %d images indexed, %d rejected", dataset, len(rows), len(rejections))
    return conform(rows)


def concat_image_tables(parts, what: str) -> pd.DataFrame:
    """Per-job image tables (the index's columns) as one, sorted by dataset and image id; an image id
    in two parts is an error naming `what`."""
    frames = [pd.read_parquet(p) for p in parts]
    frames = [f for f in frames if len(f)]
    images = conform([]) if not frames else pd.concat(frames, ignore_index=True)
    images = images.sort_values(["dataset", "image_id"], kind="stable").reset_index(drop=True)
    dup = images.image_id[images.image_id.duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"duplicate {what}: {dup[:5]}")
    return images


def gather(parts, out_images: str | Path, out_shards: str | Path, expected: dict[str, int],
           n_shards: dict[str, int]) -> pd.DataFrame:
    """Concatenate per-dataset indexes; write images.parquet and shards.tsv."""
    from openmind_bench import atomic

    images = concat_image_tables(parts, "image ids across the index")
    atomic.write_parquet(out_images, images)
    counts = images.groupby(["dataset", "shard"]).size()
    shard_rows = [
        {"dataset": d, "shard": k, "n_images": int(counts.get((d, k), 0)),
         "n_shards": n_shards[d], "expected_images": expected[d]}
        for d in sorted(n_shards) for k in range(n_shards[d])
    ]
    atomic.write_tsv(out_shards, pd.DataFrame(shard_rows))
    return images


def run_index(dataset: str, manifest_path: str | Path, out_table: str | Path, out_rejected: str | Path,
              n_shards: int, modalities: list[str], verify_data: bool = False) -> pd.DataFrame:
    """Index one fetched dataset (its tree lies beside its manifest)."""
    from openmind_bench import atomic

    manifest = Manifest.read(manifest_path)
    rejections = Rejections("index")
    table = index_dataset(dataset, Path(manifest_path).parent, manifest, n_shards, modalities,
                          rejections, verify_data=verify_data)
    atomic.write_parquet(out_table, table)
    rejections.write(out_rejected)
    return table
