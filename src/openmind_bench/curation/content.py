"""Curation by content: near-duplicate clusters among the pre-training images, and pre-training
images that are copies of downstream test cases (leakage).

- `results/curation/duplicates.parquet`: one row per image that has at least one near-duplicate
  (fingerprint distance <= `curation.duplicate_distance`); clusters are the connected components
  of that graph. Columns: cluster, size, image_id, dataset, subject, session, modality, nearest
  (the closest other member), distance (to it), max_distance (the largest linked distance in the
  cluster), datasets / subjects / sessions (the cluster's distinct values, `;`-joined).
- `results/curation/leakage.tsv`: one row per (pre-training image, downstream test-case image)
  pair within `curation.leakage_distance`: image_id, dataset, subject, session, modality,
  downstream_dataset, case, channel, distance. Every selection excludes these images.
- `results/curation/unchecked.tsv`: the images without a fingerprint (the fingerprint jobs'
  rejection parts, gathered; rejected.tsv's columns): checked for neither, never selected.

Rule `curate_content` writes all three in one job (`run_content`): the fingerprints are read once,
and the selections depend on three files rather than on every shard's (the DAG at full scale).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from openmind_bench import atomic
from openmind_bench.curation.fingerprints import read_tables
from openmind_bench.curation.neighbours import pairs_within
from openmind_bench.spreadsheet import neutralise_frame

log = logging.getLogger(__name__)

DUPLICATE_COLUMNS = ["cluster", "size", "image_id", "dataset", "subject", "session", "modality", "nearest",
                     "distance", "max_distance", "datasets", "subjects", "sessions"]
LEAKAGE_COLUMNS = ["image_id", "dataset", "subject", "session", "modality", "downstream_dataset", "case",
                   "channel", "distance"]


def duplicate_clusters(rows: pd.DataFrame, vectors: np.ndarray, threshold: float, backend: str = "faiss",
                       threads: int | None = None) -> pd.DataFrame:
    """Clusters of near-duplicates among `rows` (one fingerprint per row); singletons left out."""
    rows = rows.reset_index(drop=True)
    pairs = pairs_within(vectors, threshold, backend=backend, threads=threads)
    if pairs.empty:
        return pd.DataFrame(columns=DUPLICATE_COLUMNS)
    n = len(rows)
    graph = coo_matrix((np.ones(len(pairs)), (pairs.i.to_numpy(), pairs.j.to_numpy())), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    both = pd.concat([pairs.rename(columns={"i": "a", "j": "b"}), pairs.rename(columns={"j": "a", "i": "b"})])
    nearest = both.sort_values(["a", "distance", "b"], kind="stable").drop_duplicates("a")
    linked = nearest.a.to_numpy()
    out = rows.loc[linked, ["image_id", "dataset", "subject", "session", "modality"]].copy()
    out["component"] = label[linked]
    out["nearest"] = rows.image_id.to_numpy()[nearest.b.to_numpy()]
    out["distance"] = nearest.distance.to_numpy()
    pairs_component = label[pairs.i.to_numpy()]
    out["max_distance"] = out.component.map(pd.Series(pairs.distance.to_numpy()).groupby(pairs_component).max())
    out["size"] = out.groupby("component").image_id.transform("size")
    subjects = out.dataset + "/sub-" + out.subject
    sessions = subjects + "/ses-" + out.session.replace("", "DEFAULT")
    for column, values in (("datasets", out.dataset), ("subjects", subjects), ("sessions", sessions)):
        out[column] = out.component.map(values.groupby(out.component).agg(lambda v: ";".join(sorted(set(v)))))
    # clusters numbered by their first image id: stable whatever order the shards came in
    first = out.groupby("component").image_id.min().sort_values()
    out["cluster"] = out.component.map(pd.Series(np.arange(len(first)), index=first.index))
    out = out.sort_values(["cluster", "image_id"], kind="stable")
    return out[DUPLICATE_COLUMNS].reset_index(drop=True)


def run_duplicates(fingerprint_tables: Sequence[str | Path], out_path: str | Path, threshold: float,
                   backend: str = "faiss", threads: int | None = None) -> pd.DataFrame:
    rows, vectors = read_tables(fingerprint_tables)
    return _write_clusters(rows, vectors, out_path, threshold, backend, threads)


def _write_clusters(rows: pd.DataFrame, vectors: np.ndarray, out_path: str | Path, threshold: float,
                    backend: str, threads: int | None) -> pd.DataFrame:
    clusters = duplicate_clusters(rows, vectors, threshold, backend, threads) if len(rows) else \
        pd.DataFrame(columns=DUPLICATE_COLUMNS)
    atomic.write_parquet(out_path, clusters)
    log.info("%d image(s): %d in %d near-duplicate cluster(s) (distance <= %g)", len(rows), len(clusters),
             clusters.cluster.nunique(), threshold)
    return clusters


def leakage_pairs(rows: pd.DataFrame, vectors: np.ndarray, cases: pd.DataFrame, case_vectors: np.ndarray,
                  threshold: float, backend: str = "faiss", threads: int | None = None) -> pd.DataFrame:
    """Every (pre-training image, downstream test-case image) pair within `threshold`."""
    if len(rows) == 0 or len(cases) == 0:
        return pd.DataFrame(columns=LEAKAGE_COLUMNS)
    pairs = pairs_within(vectors, threshold, queries=case_vectors, backend=backend, threads=threads)
    rows, cases = rows.reset_index(drop=True), cases.reset_index(drop=True)
    out = pd.concat([rows.loc[pairs.j, ["image_id", "dataset", "subject", "session", "modality"]].reset_index(drop=True),
                     cases.loc[pairs.i, ["downstream_dataset", "case", "channel"]].reset_index(drop=True)], axis=1)
    out["distance"] = pairs.distance.to_numpy()
    return out.sort_values(["downstream_dataset", "case", "channel", "image_id"], kind="stable")[LEAKAGE_COLUMNS] \
        .reset_index(drop=True)


def run_leakage(fingerprint_tables: Sequence[str | Path], downstream_tables: Sequence[str | Path],
                out_path: str | Path, threshold: float, backend: str = "faiss",
                threads: int | None = None) -> pd.DataFrame:
    rows, vectors = read_tables(fingerprint_tables)
    cases, case_vectors = read_tables(downstream_tables)
    found = leakage_pairs(rows, vectors, cases, case_vectors, threshold, backend, threads)
    atomic.write_tsv(out_path, neutralise_frame(found))
    log.info("leakage: %d pre-training image(s) within %g of %d downstream test-case image(s)",
             found.image_id.nunique(), threshold, len(cases))
    return found


def read_leakage(path: str | Path | None) -> pd.DataFrame:
    if path is None or not Path(path).is_file():
        return pd.DataFrame(columns=LEAKAGE_COLUMNS)
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def leakage_counts(path: str | Path | None) -> dict[str, int]:
    """Downstream dataset -> how many pre-training images leakage.tsv excludes for it."""
    table = read_leakage(path)
    if table.empty:
        return {}
    return {str(k): int(v) for k, v in table.groupby("downstream_dataset").image_id.nunique().items()}


def run_content(fingerprint_tables: Sequence[str | Path], rejection_parts: Sequence[str | Path],
                downstream_tables: Sequence[str | Path], out_duplicates: str | Path, out_leakage: str | Path,
                out_unchecked: str | Path, duplicate_distance: float, leakage_distance: float,
                backend: str = "faiss", threads: int | None = None) -> None:
    """duplicates.parquet, leakage.tsv and unchecked.tsv from the fingerprint tables (read once)."""
    from openmind_bench.qc import read_parts

    rows, vectors = read_tables(fingerprint_tables)
    _write_clusters(rows, vectors, out_duplicates, duplicate_distance, backend, threads)
    cases, case_vectors = read_tables(downstream_tables)
    found = leakage_pairs(rows, vectors, cases, case_vectors, leakage_distance, backend, threads)
    atomic.write_tsv(out_leakage, neutralise_frame(found))
    log.info("leakage: %d pre-training image(s) within %g of %d downstream test-case image(s)",
             found.image_id.nunique(), leakage_distance, len(cases))
    unchecked = read_parts(rejection_parts)
    atomic.write_tsv(out_unchecked, neutralise_frame(unchecked))
    log.info("%d image(s) without a fingerprint (unchecked.tsv)", len(unchecked))
