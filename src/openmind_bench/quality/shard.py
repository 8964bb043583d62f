"""The quality stage: per-shard metrics (`quality_shard`) and their gather into
results/quality/iqs.parquet (`quality_gather`) with image, group and final scores."""

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
from openmind_bench.preprocess.shard import shard_rows
from openmind_bench.qc import Rejections
from openmind_bench.quality.iqms import METRICS, compute_iqms
from openmind_bench.quality.score import derivation_of, group_scores, image_score

log = logging.getLogger(__name__)

STAGE = "quality"
PART_COLUMNS = ["image_id", "dataset", "shard", "modality", "derivation", *METRICS, "image_score"]
IQS_COLUMNS = [*PART_COLUMNS, "group_score", "manual_score", "quality_score"]


def _mask(path: str, shape: tuple, default: bool) -> np.ndarray:
    if not path:
        return np.full(shape, default, bool)
    data = np.asanyarray(nib.load(path).dataobj)
    if tuple(data.shape) != tuple(shape):
        raise ValueError(f"mask {path} has shape {tuple(data.shape)}, its image {tuple(shape)}")
    return data >= 0.5


def _text(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def run_quality_shard(index_tables: Sequence[str | Path], dataset: str, shard: int, out_part: str | Path,
                      rejected_path: str | Path, settings: dict) -> pd.DataFrame:
    """Metrics and image score of every 3D image of one (dataset, shard) of the masked index."""
    rows = shard_rows(index_tables, dataset, shard)
    suffixes = {}
    for table in index_tables:
        t = pd.read_parquet(table, columns=["image_id", "suffix"])
        suffixes.update(zip(t.image_id, t.suffix))
    rejections = Rejections(STAGE)
    records = []
    started = time.perf_counter()
    for row in rows.itertuples(index=False):
        if int(row.n_volumes) > 1:
            continue
        try:
            data = np.asanyarray(nib.load(str(row.path)).dataobj).astype(np.float32)
            if data.ndim == 4 and data.shape[3] == 1:
                data = data[..., 0]
            anat = _mask(_text(row.anat_mask), data.shape, True)
            anon = _mask(_text(row.anon_mask), data.shape, False)
            iqms = compute_iqms(data, anat, anon, inu=settings["inu"])
        except Exception as e:  # one image never fails the shard
            log.exception("%s: quality metrics failed", row.image_id)
            rejections.add(row.image_id, f"{row.path}: quality metrics failed: {type(e).__name__}: {e}", dataset)
            continue
        records.append({"image_id": row.image_id, "dataset": dataset, "shard": int(shard), "modality": row.modality,
                        "derivation": derivation_of(_text(row.derived_from), suffixes.get(row.image_id, "")),
                        **iqms, "image_score": image_score(iqms, settings["references"])})
    part = pd.DataFrame(records, columns=PART_COLUMNS)
    atomic.write_parquet(out_part, part)
    rejections.write(rejected_path)
    log.info("%s shard %s: metrics of %d images in %.1f s", dataset, shard, len(part), time.perf_counter() - started)
    return part


def gather_quality(parts: Sequence[str | Path], out: str | Path, settings: dict) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in parts]
    frames = [f for f in frames if len(f)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PART_COLUMNS)
    table = group_scores(table, settings["group_rounding"], settings["manual_scores"])
    table = table.sort_values(["dataset", "image_id"], kind="stable").reset_index(drop=True)[IQS_COLUMNS]
    atomic.write_parquet(out, table)
    log.info("quality: %d images, %d groups", len(table),
             table[["dataset", "modality", "derivation"]].drop_duplicates().shape[0])
    return table
