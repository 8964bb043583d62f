"""Ranking shared by the table and the bootstrap, so both rank in exactly the same way.

Arrays have the runs on axis -2 and the datasets on axis -1 (any leading axes are bootstrap
samples). NaN marks a missing run/dataset combination: it gets no rank on that dataset and the
others are ranked among themselves.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def dataset_ranks(values: np.ndarray) -> np.ndarray:
    """Rank runs within each dataset, highest value = 1; ties share the mean of their ranks."""
    return rankdata(-np.asarray(values, dtype=float), method="average", axis=-2, nan_policy="omit")


def average_rank(values: np.ndarray) -> np.ndarray:
    """Per run, the mean of its dataset ranks over the datasets it has values for (NaN if none)."""
    ranks = dataset_ranks(values)
    present = ~np.isnan(ranks)
    count = present.sum(axis=-1)
    total = np.where(present, ranks, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def leaderboard_position(avg_rank: np.ndarray) -> np.ndarray:
    """Position on the leaderboard from average ranks (lower is better).

    Ties take the best position they span (1, 1, 3), so positions stay integers and the share of
    bootstrap samples at each position is well defined. Unranked runs get NaN.
    """
    # Rounding absorbs float noise, so equal mean ranks summed in another order still tie.
    rounded = np.round(np.asarray(avg_rank, dtype=float), 9)
    return rankdata(rounded, method="min", axis=-1, nan_policy="omit")
