"""One shard of one dataset through the masks stage: the Snakemake job `masks_shard`.

For every 3D image of the shard in the image tables (the index, plus any table a later stage
appends, e.g. DWI-derived maps) write an anatomy and an anonymisation mask in the image's grid
(`results/masks/{dataset}/sub-*/[ses-*/]{stem}_mask-anatomy.nii.gz`, `..._mask-anonymization.nii.gz`)
or keep the source's shipped masks after checking them. The shard table lists what each image got;
`merge_index` joins those tables onto the image tables for preprocessing.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from openmind_bench import atomic
from openmind_bench.masks.classical import ClassicalSettings, MaskError, compute_masks
from openmind_bench.masks.release import ReleaseMaskProblem, check_polarity, load_on_grid
from openmind_bench.preprocess.shard import shard_rows
from openmind_bench.qc import Rejections
from openmind_bench import sharding
from openmind_bench.sharding import NotRemade, source_row  # noqa: F401 (NotRemade: this stage's error)

log = logging.getLogger(__name__)

STAGE = "masks"
TABLE_COLUMNS = ["image_id", "dataset", "shard", "anat_mask", "anon_mask", "anatomy_source",
                 "anonymization_source", "mask_kind", "anatomy_fraction", "anonymized_fraction"]


def _text(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def mask_paths(out_root: str | Path, dataset: str, subject: str, session: str, image_id: str) -> tuple[Path, Path]:
    folder = Path(out_root) / dataset / f"sub-{subject}"
    if session:
        folder = folder / f"ses-{session}"
    stem = image_id.split("__", 1)[-1]
    return folder / f"{stem}_mask-anatomy.nii.gz", folder / f"{stem}_mask-anonymization.nii.gz"


def _save(mask: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import gzip

    img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    img.header.set_xyzt_units("mm")
    payload = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)  # the temporary name hides the extension
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        Path(tmp).write_bytes(payload)


def make_masker(settings: dict):
    """The configured backend as a callable (data, affine) -> Masks."""
    backend = settings["backend"]
    if backend == "classical":
        classical = ClassicalSettings.from_config(settings["classical"])
        return lambda data, affine: compute_masks(data, affine, classical)
    if backend == "nnunet":
        from openmind_bench.masks.nnunet import NnunetMasker, NnunetSettings

        return NnunetMasker(NnunetSettings.from_config(settings["nnunet"]))
    raise ValueError(f"config key 'masks.backend': unknown backend {backend!r} (classical | nnunet)")


def masks_for_image(row, data: np.ndarray, affine: np.ndarray, masker, settings: dict, rejections: Rejections,
                    out_root: str | Path) -> dict:
    """Masks of one image: the shipped ones when they pass the checks, else computed ones (written)."""
    record, computed = image_masks(row, data, affine, masker, settings, rejections, out_root)
    for path, mask in computed.items():
        _save(mask, affine, path)
    return record


def image_masks(row, data: np.ndarray, affine: np.ndarray, masker, settings: dict, rejections: Rejections,
                out_root: str | Path) -> tuple[dict, dict[Path, np.ndarray]]:
    """Masks of one image, in memory: (its mask table record, {file: mask} of the computed masks to write)."""
    dataset = row.dataset
    shipped = {"anat": _text(row.anat_mask), "anon": _text(row.anon_mask)}
    loaded = {}
    for kind, path in shipped.items():
        if not path:
            continue
        what = "release anatomy mask" if kind == "anat" else "release anonymisation mask"
        try:
            loaded[kind] = load_on_grid(path, what, data.shape, affine)
        except ReleaseMaskProblem as e:
            rejections.add(row.image_id, f"{e}; replaced by a computed mask", dataset)
    if loaded:
        problems = check_polarity(data, loaded.get("anat"), loaded.get("anon"),
                                  settings["release_max_anon_share"], settings["release_min_anat_share"])
        if problems:
            rejections.add(row.image_id, "release masks " + "; ".join(problems) + "; replaced by computed masks",
                           dataset)
            loaded = {}
    computed = None
    if len(loaded) < 2:
        computed = masker(data, affine)  # MaskError propagates: the image cannot be masked
    anat_path, anon_path = mask_paths(out_root, dataset, _text(row.subject), _text(row.session), row.image_id)
    out = {}
    to_write = {}
    for kind, path in (("anat", anat_path), ("anon", anon_path)):
        if kind in loaded:
            mask, source, file = loaded[kind], "release", shipped[kind]
        else:
            mask = computed.anat if kind == "anat" else computed.anon
            source = settings["backend"]
            to_write[path] = mask
            file = path.as_posix()
        out[kind] = (mask, source, file)
    return {
        "image_id": row.image_id, "dataset": dataset, "shard": int(row.shard),
        "anat_mask": out["anat"][2], "anon_mask": out["anon"][2],
        "anatomy_source": out["anat"][1], "anonymization_source": out["anon"][1],
        "mask_kind": computed.kind if computed is not None else "release",
        "anatomy_fraction": float(out["anat"][0].mean()), "anonymized_fraction": float(out["anon"][0].mean()),
    }, to_write


def _load_image(path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return data, img.affine


def run_masks_shard(image_tables: Sequence[str | Path], dataset: str, shard: int, out_root: str | Path,
                    out_table: str | Path, rejected_path: str | Path, settings: dict) -> pd.DataFrame:
    """Masks for every 3D image of one (dataset, shard); returns (and writes) the shard's mask table."""
    rows = shard_rows(image_tables, dataset, shard)
    rejections = Rejections(STAGE)
    masker = make_masker(settings)
    records = []
    started = time.perf_counter()
    for row in rows.itertuples(index=False):
        if int(row.n_volumes) > 1:
            continue  # a 4D series: its 3D maps (DWI stage) get masks of their own
        try:
            data, affine = _load_image(row.path)
            records.append(masks_for_image(row, data, affine, masker, settings, rejections, out_root))
        except MaskError as e:
            rejections.add(row.image_id, f"{row.path}: no masks: {e}", dataset)
        except Exception as e:  # one image never fails the shard; the log keeps the traceback
            log.exception("%s: masks failed", row.image_id)
            rejections.add(row.image_id, f"{row.path}: masks failed: {type(e).__name__}: {e}", dataset)
    table = pd.DataFrame(records, columns=TABLE_COLUMNS)
    atomic.write_parquet(out_table, table)
    rejections.write(rejected_path)
    log.info("%s shard %s: masks for %d images, %d records in %.1f s", dataset, shard, len(table),
             len(rejections), time.perf_counter() - started)
    return table


def merge_index(image_tables: Sequence[str | Path], mask_tables: Sequence[str | Path], out: str | Path) -> pd.DataFrame:
    """The image tables (concatenated) with each 3D image's mask paths from the mask tables.

    A 3D image the masks stage could not mask (recorded in the rejections) is left out; 4D series
    pass through unchanged (preprocessing skips them).
    """
    images = pd.concat([pd.read_parquet(t) for t in image_tables], ignore_index=True)
    dup = images.image_id[images.image_id.duplicated()].tolist()
    if dup:
        raise ValueError(f"image tables {list(map(str, image_tables))} list image id(s) twice: {dup[:5]}")
    frames = [pd.read_parquet(t) for t in mask_tables]
    frames = [f for f in frames if len(f)]
    masks = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TABLE_COLUMNS)
    masks = masks.set_index("image_id")
    is3d = images.n_volumes.astype(int) <= 1
    missing = is3d & ~images.image_id.isin(masks.index)
    if missing.any():
        log.info("left out (no masks): %s", images.image_id[missing].tolist())
    images = images[~missing].copy()
    hit = images.image_id.isin(masks.index)
    for column in ("anat_mask", "anon_mask"):
        images.loc[hit, column] = images.loc[hit, "image_id"].map(masks[column]).astype("string")
    atomic.write_parquet(out, images.reset_index(drop=True))
    return images


def rerun_shard_hint(mask_table: str | Path) -> str:
    return sharding.rerun_shard_hint(mask_table, "masks_shard")


def _written_masks(table: pd.DataFrame) -> list[str]:
    """The mask files the masks stage wrote for a shard table's images (not the release's own files)."""
    anat = table.anat_mask[table.anatomy_source != "release"]
    anon = table.anon_mask[table.anonymization_source != "release"]
    return [*anat.astype(str), *anon.astype(str)]


def missing_outputs(mask_tables: Sequence[str | Path]) -> list[str]:
    """The mask files the given shard tables list as written by this stage that do not exist."""
    import os

    out = []
    for t in mask_tables:
        table = pd.read_parquet(t, columns=["anat_mask", "anon_mask", "anatomy_source", "anonymization_source"])
        out += [p for p in _written_masks(table) if not os.path.exists(p)]
    return out


def remake_mask(image_tables: Sequence[str | Path], mask_table: str | Path, dataset: str, mask_path: str | Path,
                settings: dict) -> dict:
    """Re-make one mask file its shard wrote (rule `masks_image`), as the shard made it; checked against
    the shard table's record (source, fraction) before it is written. The masks live under the
    folder that holds the dataset's shard tables (`{out_root}/{dataset}/shard-{k}.parquet`).

    NotRemade when the shard table does not list the file as one it wrote, or the re-made mask differs
    from the record (the shard's inputs or settings changed since it ran): the message names the
    shard command that re-makes it.
    """
    path = Path(mask_path).as_posix()
    table = pd.read_parquet(mask_table)
    for kind, column, source, fraction in (("anat", "anat_mask", "anatomy_source", "anatomy_fraction"),
                                           ("anon", "anon_mask", "anonymization_source", "anonymized_fraction")):
        hit = table[(table[column].astype(str) == path) & (table[source] != "release")]
        if len(hit):
            break
    else:
        raise NotRemade(f"{path}: {mask_table} lists no image whose mask the masks stage wrote there (the image "
                        f"was rejected, is a 4D series or keeps its release mask), so no job makes this file; "
                        f"to run its shard again: {rerun_shard_hint(mask_table)}")
    listed = hit.iloc[0]
    rows = shard_rows(image_tables, dataset, int(listed["shard"]))
    row = source_row(rows, listed["image_id"], path, list(map(str, image_tables)), rerun_shard_hint(mask_table))
    data, affine = _load_image(row.path)
    out_root = Path(mask_table).parent.parent
    record, computed = image_masks(row, data, affine, make_masker(settings), settings, Rejections(STAGE), out_root)
    mask = computed.get(Path(path))
    if (mask is None or record[source] != listed[source]
            or not math.isclose(record[fraction], float(listed[fraction]), rel_tol=1e-9, abs_tol=1e-12)):
        raise NotRemade(f"{path}: the re-made mask differs from what {mask_table} records (source "
                        f"{record[source]} vs {listed[source]}, fraction {record[fraction]!r} vs "
                        f"{float(listed[fraction])!r}); the shard's inputs or settings changed since it ran; run "
                        f"the shard again: {rerun_shard_hint(mask_table)}")
    _save(mask, affine, Path(path))
    log.info("%s: re-made as %s records it", path, mask_table)
    return record
