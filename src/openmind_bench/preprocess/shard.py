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
from openmind_bench.preprocess.image import ImageRejected, PreprocessSettings, preprocess_image
from openmind_bench.qc import Rejections
from openmind_bench.sharding import read_shard
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
            result = preprocess_image(row.path, settings, anat_mask=_text(row.anat_mask) or None,
                                      anon_mask=_text(row.anon_mask) or None, image_id=row.image_id)
        except ImageRejected as e:
            log.warning("%s: rejected: %s", row.image_id, e)
            rejections.add(row.image_id, str(e), dataset)
            continue
        except Exception as e:  # one image must never fail the shard; the log keeps the traceback
            log.exception("%s: preprocessing failed", row.image_id)
            rejections.add(row.image_id, f"preprocessing failed: {type(e).__name__}: {e}", dataset)
            unexpected += 1
            continue
        files = image_files(out_root, dataset, _text(row.subject), _text(row.session), row.image_id)
        props = dict(result.properties, dataset=dataset, subject=_text(row.subject), session=_text(row.session),
                     modality=row.modality, derived_from=_text(row.derived_from),
                     preprocessing=settings.describe())
        write_image(files, result.image, result.anon, result.anat, props, result.nnssl_properties, settings.store)
        written.append({
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
        })
        log.info("%s: %s -> %s in %.1f s", row.image_id, "x".join(map(str, props["original"]["shape"])),
                 written[-1]["shape"], time.perf_counter() - t0)
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
