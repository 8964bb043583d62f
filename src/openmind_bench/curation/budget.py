"""The `budget` selection: an integer program (pulp/CBC) that picks images under a voxel or byte
budget, maximising the quality-weighted count, with at most `max_per_dataset` images of any dataset
and `max_per_modality` of any modality (diversity). Weight of an image: 6 - quality score
(score 1 -> 5, score 5 -> 1); an unscored image weighs `unscored_weight`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def weights(scores: pd.Series, unscored_weight: float) -> np.ndarray:
    s = pd.to_numeric(scores, errors="coerce")
    return np.where(s.isna(), unscored_weight, 6.0 - s.clip(1, 5)).astype(float)


def solve_budget(images: pd.DataFrame, cost: np.ndarray, weight: np.ndarray, budget: float,
                 max_per_dataset: int | None = None, max_per_modality: int | None = None,
                 time_limit: int = 60) -> pd.DataFrame:
    """The subset of `images` (columns dataset, modality) maximising sum(weight) with
    sum(cost) <= budget and the caps; an optimal pick (CBC), not a greedy one."""
    import pulp

    n = len(images)
    if n == 0:
        return images
    problem = pulp.LpProblem("budget_selection", pulp.LpMaximize)
    x = [pulp.LpVariable(f"x{i}", cat="Binary") for i in range(n)]
    problem += pulp.lpSum(float(weight[i]) * x[i] for i in range(n))
    problem += pulp.lpSum(float(cost[i]) * x[i] for i in range(n)) <= float(budget), "budget"
    for column, cap in (("dataset", max_per_dataset), ("modality", max_per_modality)):
        if cap is None:
            continue
        for value, idx in images.reset_index(drop=True).groupby(column).groups.items():
            problem += pulp.lpSum(x[i] for i in idx) <= int(cap), f"cap_{column}_{value}"
    status = problem.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, threads=1))
    if pulp.LpStatus[status] != "Optimal":
        raise ValueError(f"budget selection: solver status {pulp.LpStatus[status]}")
    keep = np.array([(v.value() or 0) > 0.5 for v in x])
    return images[keep]


def greedy_budget(images: pd.DataFrame, cost: np.ndarray, weight: np.ndarray, budget: float,
                  max_per_dataset: int | None = None, max_per_modality: int | None = None) -> pd.DataFrame:
    """The obvious alternative (best weight per cost first) that the integer program must beat."""
    order = np.argsort(-(weight / np.maximum(cost, 1e-12)), kind="stable")
    used, per_ds, per_mod, keep = 0.0, {}, {}, []
    for i in order:
        ds, mod = images.dataset.iloc[i], images.modality.iloc[i]
        if used + cost[i] > budget:
            continue
        if max_per_dataset is not None and per_ds.get(ds, 0) >= max_per_dataset:
            continue
        if max_per_modality is not None and per_mod.get(mod, 0) >= max_per_modality:
            continue
        used += cost[i]
        per_ds[ds] = per_ds.get(ds, 0) + 1
        per_mod[mod] = per_mod.get(mod, 0) + 1
        keep.append(i)
    return images.iloc[sorted(keep)]


def image_costs(images: pd.DataFrame, unit: str) -> np.ndarray:
    """Voxels of the preprocessed image (manifest `shape`) or bytes of its store file."""
    if unit == "voxels":
        return np.array([math.prod(int(v) for v in str(s).split("x")) for s in images["shape"]], float)
    if unit == "bytes":
        import os

        return np.array([float(os.path.getsize(p)) for p in images["image"]], float)
    raise ValueError(f"budget unit {unit!r}: voxels or bytes")


def drop_test_subjects(images: pd.DataFrame, excluded: set[tuple[str, str]]) -> pd.DataFrame:
    if not excluded:
        return images
    whole = {d for d, s in excluded if s == "*"}
    hit = [(d in whole) or ((d, s) in excluded) for d, s in zip(images.dataset, images.subject.astype(str))]
    return images[~np.asarray(hit, bool)]
