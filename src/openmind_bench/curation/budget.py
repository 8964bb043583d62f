"""The `budget` selection: an integer program (pulp/CBC) that picks images under a voxel or byte
budget, maximising the quality-weighted count, with at most `max_per_dataset` images of any dataset
and `max_per_modality` of any modality (diversity). Weight of an image: 6 - quality score
(score 1 -> 5, score 5 -> 1); an unscored image weighs `unscored_weight`.

Optional balance bounds (`budget.balance`): for a metadata column (sex, an age binning, field
strength, manufacturer, modality, ...), the share of each of its groups among the chosen images
lies within [min, max]: linear constraints lo * sum(x) <= sum(x in group) <= hi * sum(x). Missing
values are a group of their own (`missing`). Bounds no non-empty selection can meet are an error
naming the column and the group, never relaxed.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def weights(scores: pd.Series, unscored_weight: float) -> np.ndarray:
    s = pd.to_numeric(scores, errors="coerce")
    return np.where(s.isna(), unscored_weight, 6.0 - s.clip(1, 5)).astype(float)


MISSING = "missing"


class BalanceError(ValueError):
    """Balance bounds that no non-empty selection meets."""


def balance_groups(images: pd.DataFrame, spec: dict) -> pd.Series:
    """The group label of every image under one balance entry: the column's value as text, or its
    bin `[lo, hi)` when `bins` are given (numeric columns such as age); missing values -> `missing`."""
    column = spec["column"]
    if column not in images.columns:
        raise BalanceError(f"balance column {column!r} is not an image table column")
    values = images[column]
    if spec.get("bins"):
        edges = [float(e) for e in spec["bins"]]
        numeric = pd.to_numeric(values, errors="coerce")
        labels = [f"[{a:g}, {b:g})" for a, b in zip(edges[:-1], edges[1:])]
        binned = pd.cut(numeric, edges, right=False, labels=labels)
        return binned.astype(object).where(binned.notna(), MISSING).astype(str)
    text = values.astype(object).where(values.notna(), MISSING).astype(str)
    return text.replace({"": MISSING, "nan": MISSING, "<NA>": MISSING})


def balance_bounds(groups: pd.Series, spec: dict) -> dict[str, tuple[float, float]]:
    """{group: (min share, max share)} for every group present, checked for feasibility."""
    column = spec["column"]
    default = tuple(float(v) for v in spec.get("default") or (0.0, 1.0))
    named = {str(k): tuple(float(x) for x in v) for k, v in (spec.get("groups") or {}).items()}
    present = sorted(set(groups))
    for g, (lo, hi) in {**{g: default for g in present}, **named}.items():
        if not 0 <= lo <= hi <= 1:
            raise BalanceError(f"balance column {column!r}, group {g!r}: bounds [{lo}, {hi}] must satisfy "
                               "0 <= min <= max <= 1")
    absent = [g for g, (lo, _) in named.items() if lo > 0 and g not in present]
    if absent:
        raise BalanceError(f"balance column {column!r}: group(s) {absent} have a minimum share but no image "
                           f"(groups present: {present})")
    bounds = {g: named.get(g, default) for g in present}
    if sum(lo for lo, _ in bounds.values()) > 1 + 1e-9:
        raise BalanceError(f"balance column {column!r}: the minimum shares add up to "
                           f"{sum(lo for lo, _ in bounds.values()):g} > 1 ({bounds})")
    if sum(hi for _, hi in bounds.values()) < 1 - 1e-9:
        raise BalanceError(f"balance column {column!r}: the maximum shares of the groups present add up to "
                           f"{sum(hi for _, hi in bounds.values()):g} < 1 ({bounds})")
    return bounds


def solve_budget(images: pd.DataFrame, cost: np.ndarray, weight: np.ndarray, budget: float,
                 max_per_dataset: int | None = None, max_per_modality: int | None = None,
                 time_limit: int = 600, balance: list[dict] | None = None, what: str = "budget selection",
                 mip_gap: float = 1e-4) -> pd.DataFrame:
    """The subset of `images` (columns dataset, modality) maximising sum(weight) with
    sum(cost) <= budget, the caps and the balance bounds; an optimal pick (CBC, within a relative
    gap of `mip_gap` of the LP bound: balance bounds make proving exact optimality slow), not a
    greedy one."""
    import pulp

    n = len(images)
    if n == 0:
        return images
    groups = [(spec["column"], balance_groups(images, spec).to_numpy(), balance_bounds(balance_groups(images, spec), spec))
              for spec in (balance or [])]
    problem = pulp.LpProblem("budget_selection", pulp.LpMaximize)
    x = [pulp.LpVariable(f"x{i}", cat="Binary") for i in range(n)]
    problem += pulp.lpSum(float(weight[i]) * x[i] for i in range(n))
    problem += pulp.lpSum(float(cost[i]) * x[i] for i in range(n)) <= float(budget), "budget"
    for column, cap in (("dataset", max_per_dataset), ("modality", max_per_modality)):
        if cap is None:
            continue
        for value, idx in images.reset_index(drop=True).groupby(column).groups.items():
            problem += pulp.lpSum(x[i] for i in idx) <= int(cap), f"cap_{column}_{value}"
    total = pulp.lpSum(x)
    for k, (column, labels, bounds) in enumerate(groups):
        for n_bounds, (g, (lo, hi)) in enumerate(bounds.items()):
            members = pulp.lpSum(x[i] for i in np.flatnonzero(labels == g))
            if lo > 0:
                problem += members - lo * total >= 0, f"balance{k}_min_{n_bounds}"
            if hi < 1:
                problem += members - hi * total <= 0, f"balance{k}_max_{n_bounds}"
    status = problem.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, threads=1, gapRel=mip_gap))
    if pulp.LpStatus[status] != "Optimal":
        raise ValueError(f"{what}: solver status {pulp.LpStatus[status]}")
    keep = np.array([(v.value() or 0) > 0.5 for v in x])
    if groups and not keep.any():
        raise BalanceError(f"{what}: no non-empty pick within the budget meets the balance bounds of column(s) "
                           f"{[c for c, _, _ in groups]}")
    for column, labels, bounds in groups:  # the solver's tolerances must not bend a bound
        shares = pd.Series(labels[keep]).value_counts(normalize=True)
        for g, (lo, hi) in bounds.items():
            share = float(shares.get(g, 0.0))
            if not lo - 1e-6 <= share <= hi + 1e-6:
                raise BalanceError(f"{what}: balance column {column!r}, group {g!r}: share {share:.4f} outside "
                                   f"[{lo}, {hi}] in the solver's pick")
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


def test_subject_mask(images: pd.DataFrame, excluded: set[tuple[str, str]]) -> np.ndarray:
    """True for images of (dataset, subject) pairs in `excluded` ("*" = every subject of the dataset)."""
    whole = {d for d, s in excluded if s == "*"}
    return np.asarray([(d in whole) or ((d, s) in excluded)
                       for d, s in zip(images.dataset, images.subject.astype(str))], bool).reshape(len(images))


def drop_test_subjects(images: pd.DataFrame, excluded: set[tuple[str, str]]) -> pd.DataFrame:
    if not excluded:
        return images
    return images[~test_subject_mask(images, excluded)]
