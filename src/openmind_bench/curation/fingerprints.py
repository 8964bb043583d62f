"""Fingerprint tables: one per preprocessing shard (rule `fingerprint_shard`) and one per downstream
dataset's test cases (rule `downstream_fingerprints`), both read back as one matrix.

A shard job reads the images its preprocessing shard wrote (the manifest) from the store; a
downstream job preprocesses each test case's channel images exactly as the pre-training images were
(`preprocess.image.preprocess_image` with the run's settings) and fingerprints the result, so the
two kinds are compared like with like. An image whose fingerprint cannot be computed is recorded in
the job's rejection part (stage `curation`) and left out of the table; it never fails the job.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from openmind_bench import atomic
from openmind_bench.curation.fingerprint import FingerprintSettings, fingerprint
from openmind_bench.preprocess.shard import read_manifests
from openmind_bench.qc import Rejections
from openmind_bench.store.b2nd import open_array

log = logging.getLogger(__name__)

STAGE = "curation"
SHARD_COLUMNS = ["image_id", "dataset", "subject", "session", "modality"]
DOWNSTREAM_COLUMNS = ["downstream_dataset", "case", "channel", "path"]


def _spacing(text: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in str(text).split("x"))
    if len(values) != 3:
        raise ValueError(f"spacing {text!r} is not XxYxZ")
    return values


def write_table(path: str | Path, rows: pd.DataFrame, vectors: np.ndarray, dimension: int) -> None:
    """`rows` (text columns) plus a fixed-size list column `fingerprint`, as parquet, atomically."""
    vectors = np.asarray(vectors, np.float32).reshape(len(rows), dimension)
    table = pa.Table.from_pandas(rows.reset_index(drop=True), preserve_index=False)
    flat = pa.array(vectors.ravel(), pa.float32())
    table = table.append_column("fingerprint", pa.FixedSizeListArray.from_arrays(flat, dimension))
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))


def read_tables(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, np.ndarray]:
    """(rows, fingerprints as an (N, D) float32 matrix) of several tables, concatenated."""
    frames, blocks, dimension = [], [], None
    for p in paths:
        table = pq.read_table(str(p))
        column = table.column("fingerprint").combine_chunks()
        d = column.type.list_size
        if dimension is not None and d != dimension:
            raise ValueError(f"{p}: fingerprints of dimension {d}, others have {dimension}; run its job again")
        dimension = d
        blocks.append(column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), d))
        frames.append(table.drop(["fingerprint"]).to_pandas())
    if not frames:
        return pd.DataFrame(), np.zeros((0, 0), np.float32)
    return pd.concat(frames, ignore_index=True), np.concatenate(blocks).astype(np.float32)


def run_fingerprint_shard(manifest_path: str | Path, out_path: str | Path, rejected_path: str | Path,
                          settings: FingerprintSettings) -> pd.DataFrame:
    """Fingerprint every image a preprocessing shard manifest lists; write the table and the
    rejection part (images whose fingerprint cannot be computed, stage `curation`)."""
    manifest = read_manifests([manifest_path])
    atomic.remove_temporaries([Path(out_path), Path(rejected_path)])
    rejections = Rejections(STAGE)
    rows, vectors = [], []
    started = time.perf_counter()
    for row in manifest.itertuples(index=False):
        try:
            image = open_array(row.image)[...]
            vectors.append(fingerprint(image[0] if image.ndim == 4 else image, _spacing(row.spacing), settings))
        except Exception as e:  # one image never fails the shard; the reason goes to rejected.tsv
            log.warning("%s: no fingerprint: %s", row.image_id, e)
            rejections.add(row.image_id, f"fingerprint failed: {type(e).__name__}: {e}", row.dataset)
            continue
        rows.append({c: str(getattr(row, c)) for c in SHARD_COLUMNS})
    frame = pd.DataFrame(rows, columns=SHARD_COLUMNS)
    write_table(out_path, frame, np.array(vectors, np.float32), settings.dimension)
    rejections.write(rejected_path)
    log.info("%s: %d fingerprint(s), %d rejected, in %.1f s", manifest_path, len(frame), len(rejections),
             time.perf_counter() - started)
    return frame


def split_test_images(split_path: str | Path, source: str | Path) -> list[tuple[str, int, Path]]:
    """(case, channel, image file) of every test case of a downstream split.

    The split records each case's files (`case_files`, paths relative to the dataset folder); the
    channel images are the files named `{case}_{channel:04d}{ending}` (nnU-Net's naming, which both
    registry formats use), the label file is the one without a channel number."""
    doc = json.loads(Path(split_path).read_text())
    case_files = doc.get("case_files") or {}
    out = []
    for case in doc.get("test") or []:
        pattern = re.compile(rf"^{re.escape(case)}_(\d{{4}})\.")
        files = case_files.get(case)
        if files is None:
            raise ValueError(f"split {split_path}: test case {case!r} has no `case_files` record; make the split anew")
        for rel in sorted(files):
            m = pattern.match(Path(rel).name)
            if m:
                p = Path(rel)
                out.append((case, int(m.group(1)), p if p.is_absolute() else Path(source) / p))
    return out


def run_downstream_fingerprints(split_path: str | Path, dataset: str, source: str | Path, out_path: str | Path,
                                rejected_path: str | Path, preprocess_settings, settings: FingerprintSettings
                                ) -> pd.DataFrame:
    """Fingerprint every channel image of a downstream dataset's test cases after the pre-training
    images' preprocessing; a case image that cannot be preprocessed or fingerprinted is recorded
    (stage `curation`) and left out."""
    from openmind_bench.preprocess.image import preprocess_image

    atomic.remove_temporaries([Path(out_path), Path(rejected_path)])
    rejections = Rejections(STAGE)
    rows, vectors = [], []
    for case, channel, path in split_test_images(split_path, source):
        try:
            result = preprocess_image(path, preprocess_settings, image_id=f"{dataset}/{case}_{channel:04d}")
            vectors.append(fingerprint(result.image[0], result.properties["spacing"], settings))
        except Exception as e:
            log.warning("%s channel %d: no fingerprint: %s", case, channel, e)
            rejections.add(str(path), f"downstream test case {case}: fingerprint failed: {type(e).__name__}: {e}",
                           dataset)
            continue
        rows.append({"downstream_dataset": dataset, "case": case, "channel": str(channel), "path": str(path)})
    frame = pd.DataFrame(rows, columns=DOWNSTREAM_COLUMNS)
    write_table(out_path, frame, np.array(vectors, np.float32), settings.dimension)
    rejections.write(rejected_path)
    log.info("%s: %d test-case image(s) fingerprinted, %d rejected", dataset, len(frame), len(rejections))
    return frame
