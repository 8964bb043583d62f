"""All pairs of fingerprints within a distance: faiss (exact flat index, default) or scikit-learn.

Both are exact (no approximate index): a duplicate missed by an approximate search would be a
silent false negative, and at 114k x 511 an exact range search takes faiss about a minute on two
cores (docs/stages.md, Curation by content; benchmarks/curation_neighbours.py --search).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

BACKENDS = ("faiss", "sklearn")


def _as_matrix(x) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"fingerprints must be a 2D array, got shape {x.shape}")
    return x


def pairs_within(x, radius: float, queries=None, backend: str = "faiss", threads: int | None = None) -> pd.DataFrame:
    """Pairs (i, j, distance) with Euclidean distance <= radius.

    Without `queries`: pairs within `x`, each once with i < j. With `queries`: i indexes `queries`,
    j indexes `x`. Sorted by (i, j)."""
    if backend not in BACKENDS:
        raise ValueError(f"neighbour backend {backend!r}: one of {BACKENDS}")
    x = _as_matrix(x)
    q = x if queries is None else _as_matrix(queries)
    empty = pd.DataFrame({"i": np.array([], np.int64), "j": np.array([], np.int64), "distance": np.array([], float)})
    if len(x) == 0 or len(q) == 0:
        return empty
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"query dimension {q.shape[1]} differs from the index's {x.shape[1]}")
    if backend == "faiss":
        import faiss

        if threads:
            faiss.omp_set_num_threads(int(threads))
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        lims, d2, j = index.range_search(q, float(radius) ** 2)
        i = np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64)))
        dist = np.sqrt(np.clip(d2.astype(np.float64), 0, None))
    else:
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(radius=float(radius), algorithm="brute", n_jobs=threads).fit(x)
        dists, idx = nn.radius_neighbors(q, return_distance=True)
        i = np.repeat(np.arange(len(q)), [len(a) for a in idx])
        j = np.concatenate(idx) if len(idx) else np.array([], np.int64)
        dist = np.concatenate(dists) if len(dists) else np.array([], float)
    out = pd.DataFrame({"i": i.astype(np.int64), "j": np.asarray(j, np.int64), "distance": dist.astype(float)})
    if queries is None:
        out = out[out.i < out.j]
    return out.sort_values(["i", "j"], kind="stable").reset_index(drop=True)
