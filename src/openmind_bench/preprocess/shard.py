"""One shard of one dataset through preprocessing: the Snakemake job `preprocess_shard`.

Reads only the shard's rows of the index table(s), writes every image it can into the store,
records each broken image in the rejection part and lists what it wrote in the shard manifest
(a TSV, the job's declared output: the images inside a shard are known only from the data).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import pyarrow.dataset as pads

from openmind_bench import atomic
from openmind_bench.preprocess.image import (ANATOMY_DEFAULT, ANONYMIZATION_DEFAULT, ImageRejected,
                                            PreprocessSettings, preprocess_image)
from openmind_bench.qc import Rejections
from openmind_bench import sharding
from openmind_bench.sharding import NotRemade, read_shard, source_row  # noqa: F401 (NotRemade: this stage's error)
from openmind_bench.store.files import image_files, write_image

log = logging.getLogger(__name__)

STAGE = "preprocess"
INDEX_COLUMNS = ["image_id", "dataset", "shard", "subject", "session", "modality", "path",
                 "derived_from", "n_volumes", "anat_mask", "anon_mask"]
MANIFEST_COLUMNS = ["image_id", "dataset", "shard", "subject", "session", "modality", "image", "anon",
                    "anat", "properties", "shape", "spacing", "anatomy_mask_source",
                    "anonymization_mask_source", "anatomy_fraction", "anonymized_fraction"]


def shard_rows(index_tables: Sequence[str | Path], dataset: str, shard: int) -> pd.DataFrame:
    """The rows of one (dataset, shard) from one or more index tables, read with a row filter."""
    for table in index_tables:
        missing = [c for c in INDEX_COLUMNS if c not in pads.dataset(str(table), format="parquet").schema.names]
        if missing:
            raise ValueError(f"index table {table} lacks column(s) {missing}")
    return read_shard(index_tables, dataset, shard, columns=INDEX_COLUMNS)


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    return str(value)


def remove_leftovers(rows: pd.DataFrame, out_root: str | Path, dataset: str, *paths: str | Path) -> int:
    """Remove temporary files (`.name.tmp-PID`) a killed run of this shard left beside its outputs.

    Only the shard's own output names are looked at (image ids belong to exactly one shard, and
    one job runs a shard), so a concurrent shard of the same dataset is never touched.
    """
    outputs = [Path(p) for p in paths]
    for row in rows.itertuples(index=False):
        outputs += image_files(out_root, dataset, _text(row.subject), _text(row.session), row.image_id).all()
    removed = atomic.remove_temporaries(outputs)
    if removed:
        log.info("%s: removed %d temporary file(s) left by a killed run, e.g. %s", dataset, len(removed),
                 removed[0])
    return len(removed)



def preprocess_row(row, dataset: str, shard: int, out_root: str | Path, settings: PreprocessSettings):
    """One index row through preprocessing, in memory: (its files, its manifest record, a function
    that writes the files). ImageRejected (and any other error) propagates."""
    result = preprocess_image(row.path, settings, anat_mask=_text(row.anat_mask) or None,
                              anon_mask=_text(row.anon_mask) or None, image_id=row.image_id)
    files = image_files(out_root, dataset, _text(row.subject), _text(row.session), row.image_id)
    props = dict(result.properties, dataset=dataset, subject=_text(row.subject), session=_text(row.session),
                 modality=row.modality, derived_from=_text(row.derived_from),
                 preprocessing=settings.describe())
    record = {
        "image_id": row.image_id, "dataset": dataset, "shard": int(shard), "subject": _text(row.subject),
        "session": _text(row.session), "modality": row.modality,
        "image": files.image.as_posix(), "anon": files.anon.as_posix(), "anat": files.anat.as_posix(),
        "properties": files.properties.as_posix(),
        "shape": "x".join(str(s) for s in props["shape"]),
        "spacing": "x".join(f"{s:.4g}" for s in props["spacing"]),
        "anatomy_mask_source": props["anatomy_mask_source"],
        "anonymization_mask_source": props["anonymization_mask_source"],
        "anatomy_fraction": props["anatomy_fraction"],
        "anonymized_fraction": props["anonymized_fraction"],
    }

    def write() -> None:
        write_image(files, result.image, result.anon, result.anat, props, result.nnssl_properties, settings.store)

    return files, record, write


def run_preprocess_shard(
    index_tables: Sequence[str | Path],
    dataset: str,
    shard: int,
    out_root: str | Path,
    manifest_path: str | Path,
    rejected_path: str | Path,
    settings: PreprocessSettings,
) -> pd.DataFrame:
    """Preprocess every 3D image of the shard; returns (and writes) the shard manifest."""
    rows = shard_rows(index_tables, dataset, shard)
    remove_leftovers(rows, out_root, dataset, manifest_path, rejected_path)
    rejections = Rejections(STAGE)
    written = []
    unexpected = 0
    started = time.perf_counter()
    for row in rows.itertuples(index=False):
        if int(row.n_volumes) > 1:
            log.info("%s: skipped, a 4D %s series (%d volumes); it enters the store through the 3D maps "
                     "the DWI stage derives from it", row.image_id, row.modality, int(row.n_volumes))
            continue
        t0 = time.perf_counter()
        try:
            files, record, write = preprocess_row(row, dataset, shard, out_root, settings)
        except ImageRejected as e:
            log.warning("%s: rejected: %s", row.image_id, e)
            rejections.add(row.image_id, str(e), dataset)
            continue
        except Exception as e:  # one image must never fail the shard; the log keeps the traceback
            log.exception("%s: preprocessing failed", row.image_id)
            rejections.add(row.image_id, f"preprocessing failed: {type(e).__name__}: {e}", dataset)
            unexpected += 1
            continue
        write()
        written.append(record)
        log.info("%s: -> %s in %.1f s", row.image_id, record["shape"], time.perf_counter() - t0)
    attempted = len(written) + len(rejections)
    if unexpected and unexpected == attempted and attempted >= 3:
        # every image failing the same unforeseen way points at the code or the environment, not the data
        raise RuntimeError(f"{dataset} shard {shard}: all {attempted} images failed unexpectedly; see the log")
    manifest = pd.DataFrame(written, columns=MANIFEST_COLUMNS)
    atomic.write_tsv(manifest_path, manifest)
    rejections.write(rejected_path)
    log.info("%s shard %s: %d written, %d rejected, %d skipped (4D) in %.1f s", dataset, shard, len(written),
             len(rejections), len(rows) - attempted, time.perf_counter() - started)
    return manifest


def read_manifests(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate shard manifests (every image the preprocessing wrote)."""
    frames = [pd.read_csv(p, sep="\t", dtype={"session": str, "subject": str}, keep_default_na=False)
              for p in paths]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=MANIFEST_COLUMNS)
    return pd.concat(frames, ignore_index=True)[MANIFEST_COLUMNS]


def rerun_shard_hint(manifest_path: str | Path) -> str:
    return sharding.rerun_shard_hint(manifest_path, "preprocess_shard")


def listed_files(manifest: pd.DataFrame) -> list[str]:
    """Every file the manifest's images have in the store: image, masks, properties (.json, .pkl)."""
    out = []
    for image, anon, anat, props in zip(manifest.image, manifest.anon, manifest.anat, manifest.properties):
        out += [image, anon, anat, props]
        if props.endswith(".json"):
            out.append(props[: -len(".json")] + ".pkl")
    return out


def missing_outputs(manifest_paths: Sequence[str | Path]) -> list[str]:
    """The store files the given shard manifests list that do not exist (deleted after their shard ran)."""
    import os

    return [p for p in listed_files(read_manifests(manifest_paths)) if not os.path.exists(p)]


def mask_files(manifest_path: str | Path, image_id: str) -> list[str]:
    """The mask files the shard preprocessed the image with (none when the manifest does not list it)."""
    manifest = read_manifests([manifest_path])
    hit = manifest[manifest.image_id == image_id]
    sources = [*hit.anatomy_mask_source, *hit.anonymization_mask_source]
    return [s for s in sources if s not in (ANATOMY_DEFAULT, ANONYMIZATION_DEFAULT)]


_COMPARED = ("shape", "spacing", "anatomy_mask_source", "anonymization_mask_source")
_COMPARED_FLOAT = ("anatomy_fraction", "anonymized_fraction")


def _differences(record: dict, listed: pd.Series) -> list[str]:
    out = [f"{k} {record[k]} (manifest: {listed[k]})" for k in _COMPARED if str(record[k]) != str(listed[k])]
    out += [f"{k} {record[k]!r} (manifest: {listed[k]!r})" for k in _COMPARED_FLOAT
            if not math.isclose(float(record[k]), float(listed[k]), rel_tol=1e-9, abs_tol=1e-12)]
    return out


def remake_image(index_tables: Sequence[str | Path], manifest_path: str | Path, dataset: str, image_id: str,
                 out_root: str | Path, settings: PreprocessSettings) -> dict:
    """Re-make the store files of one image its shard wrote (rule `preprocess_image`), as the shard made
    them; the result is checked against the shard manifest's record before anything is written.

    NotRemade when the manifest does not list the image (rejected, a 4D series, not in this dataset)
    or the result differs from the manifest (the shard's inputs or settings changed since it ran):
    the message names the shard command that re-makes it.
    """
    manifest = read_manifests([manifest_path])
    hit = manifest[manifest.image_id == image_id]
    if hit.empty:
        raise NotRemade(f"{image_id}: {manifest_path} does not list this image (the shard rejected it, see "
                        f"results/qc/rejected.tsv, or skipped it as a 4D series), so preprocessing makes no "
                        f"files for it; to run its shard again: {rerun_shard_hint(manifest_path)}")
    listed = hit.iloc[0]
    shard = int(listed["shard"])
    rows = shard_rows(index_tables, dataset, shard)
    row = source_row(rows, image_id, image_id, list(map(str, index_tables)), rerun_shard_hint(manifest_path))
    files, record, write = preprocess_row(row, dataset, shard, out_root, settings)
    differs = _differences(record, listed)
    if differs:
        raise NotRemade(f"{image_id}: the re-made image differs from what {manifest_path} records: "
                        f"{'; '.join(differs)}. The shard's inputs or settings changed since it ran; run the "
                        f"shard again: {rerun_shard_hint(manifest_path)}")
    write()
    log.info("%s: re-made %s as %s records it", image_id, files.image, manifest_path)
    return record
