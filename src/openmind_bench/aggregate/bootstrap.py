"""Rank stability by bootstrapping the test cases (the papers' Fig. 2).

Each bootstrap sample redraws, with replacement, the cases of every dataset, separately within
each fold so that a dataset's value stays "mean over cases, then over folds". The draw is shared
by all runs and all metrics (a paired bootstrap: every run is scored on the same resampled test
set), and each dataset has its own random stream seeded by (seed, dataset name), so adding a
dataset does not change the draws of the others. A run/dataset cell that only has a summary
value (no per-case rows) is held fixed. Every sample is then ranked exactly like the table:
ranks within each dataset (ties share the mean rank), averaged over datasets, and turned into a
leaderboard position (ties take the best position).

Runs repeated over seeds (fold labels `{fold}/s{seed}`, `results.fold_label`) are resampled at two
levels: every sample draws the seeds with replacement (one draw per dataset and fold, shared by all
runs, so a pre-trained run and its scratch baseline keep their pairing by seed, which also pairs
their low-data cases), then the cases, which all seeds of a fold share. The interval of a run's
delta to scratch (`deltas`) is the spread of that difference over the same samples, so it holds the
test-set sampling and, where there are seeds, the seed-to-seed spread.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from openmind_bench.aggregate.ranking import average_rank, leaderboard_position
from openmind_bench.aggregate.results import RUN_KEY, SEED_MARK, base_fold, dataset_values, present_metrics
from openmind_bench.aggregate.table import metric_matrix, scratch_references

CI = (2.5, 97.5)


@dataclass
class Draws:
    """Resampling counts per (dataset, fold): the sorted case ids and a samples x cases matrix."""

    n_samples: int
    counts: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]
    # (dataset, fold label of a seed) -> how often each sample drew that seed; labels absent weigh 1
    seed_weights: dict[tuple[str, str], np.ndarray] = None


@dataclass
class BootstrapResult:
    ranks: pd.DataFrame  # ranks_bootstrap.csv
    intervals: pd.DataFrame  # bootstrap_intervals.csv
    deltas: pd.DataFrame = None  # delta_scratch_intervals.csv (DELTA_COLUMNS)


DELTA_COLUMNS = [*RUN_KEY, "metric", "reference", "delta", "ci_low", "ci_high", "seeds", "n_samples"]


def draw_cases(frame: pd.DataFrame, n_samples: int, seed: int) -> Draws:
    if n_samples < 1:
        raise ValueError(f"the number of bootstrap samples must be at least 1, got {n_samples}")
    counts = {}
    cases = frame[frame.case != ""]
    for dataset, by_dataset in cases.groupby("dataset", sort=True):
        # crc32 is stable across processes, unlike hash().
        rng = np.random.default_rng([seed, zlib.crc32(str(dataset).encode())])
        # the seeds of a fold share its draw of cases (their test cases are the same)
        for _, by_fold in by_dataset.groupby(by_dataset.fold.map(base_fold), sort=True):
            units = np.sort(by_fold.case.unique().astype(str))
            k = len(units)
            picks = rng.integers(0, k, size=(n_samples, k))
            rows = np.repeat(np.arange(n_samples), k)
            drawn = np.bincount(rows * k + picks.ravel(), minlength=n_samples * k).reshape(n_samples, k)
            for label in by_fold.fold.unique():
                counts[(dataset, label)] = (units, drawn)
    return Draws(n_samples, counts, _draw_seeds(frame, n_samples, seed))


def _draw_seeds(frame: pd.DataFrame, n_samples: int, seed: int) -> dict[tuple[str, str], np.ndarray]:
    """Per dataset and fold with several seed labels: how often each of n_samples draws (with
    replacement, as many as there are seeds) picks each seed."""
    weights = {}
    seeded = frame[frame.fold.str.contains(SEED_MARK, regex=False)]
    for (dataset, fold), group in seeded.groupby([seeded.dataset, seeded.fold.map(base_fold)], sort=True):
        labels = sorted(group.fold.unique())
        k = len(labels)
        if k < 2:
            continue
        rng = np.random.default_rng([seed, zlib.crc32(str(dataset).encode()), zlib.crc32(str(fold).encode()), 1])
        picks = rng.integers(0, k, size=(n_samples, k))
        rows = np.repeat(np.arange(n_samples), k)
        drawn = np.bincount(rows * k + picks.ravel(), minlength=n_samples * k).reshape(n_samples, k)
        weights.update({(dataset, label): drawn[:, i].astype(float) for i, label in enumerate(labels)})
    return weights


def resampled_values(
    frame: pd.DataFrame, metric: str, runs: list[tuple], datasets: list[str], draws: Draws
) -> np.ndarray:
    """samples x runs x datasets values of one metric under the given draws (NaN = missing)."""
    n, n_runs = draws.n_samples, len(runs)
    run_index = {run: i for i, run in enumerate(runs)}
    out = np.full((n, n_runs, len(datasets)), np.nan)
    rows = frame[frame.metric == metric]
    for j, dataset in enumerate(datasets):
        fold_sum = np.zeros((n, n_runs))
        fold_count = np.zeros((n, n_runs))
        for fold, by_fold in rows[rows.dataset == dataset].groupby("fold", sort=True):
            fold_mean = np.full((n, n_runs), np.nan)
            run_ids = np.array([run_index[r] for r in zip(*(by_fold[c] for c in RUN_KEY))])
            is_case = (by_fold.case != "").to_numpy()
            if is_case.any():
                units, counts = draws.counts[(dataset, fold)]
                ri = run_ids[is_case]
                ui = np.searchsorted(units, by_fold.case.to_numpy()[is_case].astype(str))
                value = np.zeros((n_runs, len(units)))
                has = np.zeros((n_runs, len(units)))
                value[ri, ui] = by_fold.value.to_numpy()[is_case]
                has[ri, ui] = 1.0
                num, den = counts @ value.T, counts @ has.T
                with np.errstate(invalid="ignore", divide="ignore"):
                    mean = np.where(den > 0, num / den, np.nan)
                with_cases = np.unique(ri)
                fold_mean[:, with_cases] = mean[:, with_cases]
            # Summary rows: the same value in every sample.
            fold_mean[:, run_ids[~is_case]] = by_fold.value.to_numpy()[~is_case]
            present = ~np.isnan(fold_mean)
            weight = (draws.seed_weights or {}).get((dataset, fold))
            weight = np.ones((n, 1)) if weight is None else weight[:, None]
            fold_sum += np.where(present, fold_mean * weight, 0.0)
            fold_count += present * weight
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, :, j] = np.where(fold_count > 0, fold_sum / fold_count, np.nan)
    return out


def _nanpercentile(x: np.ndarray, q: float) -> np.ndarray:
    """Percentile over axis 0 ignoring NaN; NaN (without a warning) where all are NaN."""
    ok = ~np.isnan(x).all(axis=0)
    result = np.full(x.shape[1:], np.nan)
    if ok.any():
        result[ok] = np.nanpercentile(x[:, ok], q, axis=0)
    return result


def bootstrap(
    frame: pd.DataFrame, n_samples: int = 1000, seed: int = 0, dataset_order: list[str] | None = None
) -> BootstrapResult:
    """Rank statistics and per-dataset intervals for every run of every metric."""
    draws = draw_cases(frame, n_samples, seed)
    observed = dataset_values(frame)
    datasets_all = dataset_order or sorted(frame.dataset.unique())
    rank_blocks, interval_blocks, delta_blocks = [], [], []
    max_runs = 0
    for metric in present_metrics(frame):
        wide = metric_matrix(observed, metric, datasets_all)
        runs, datasets = list(wide.index), list(wide.columns)
        max_runs = max(max_runs, len(runs))
        samples = resampled_values(frame, metric, runs, datasets, draws)
        pos = leaderboard_position(average_rank(samples))  # samples x runs
        observed_pos = leaderboard_position(average_rank(wide.to_numpy()))

        ranked = ~np.isnan(pos)
        count = ranked.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, np.where(ranked, pos, 0).sum(axis=0) / np.maximum(count, 1), np.nan)
        sq = np.where(ranked, (pos - mean) ** 2, 0).sum(axis=0)
        std = np.where(count > 1, np.sqrt(sq / np.maximum(count - 1, 1)), np.where(count == 1, 0.0, np.nan))
        block = pd.DataFrame(runs, columns=RUN_KEY)
        block["metric"] = metric
        block["n_samples"] = n_samples
        resampled = _resampled_cells(frame, metric, runs, datasets)
        block["datasets_resampled"] = resampled.sum(axis=1)
        block["datasets_fixed"] = (wide.notna().to_numpy() & ~resampled).sum(axis=1)
        block["rank_observed"] = observed_pos
        block["rank_mean"] = mean
        block["rank_std"] = std
        block["rank_ci_low"] = _nanpercentile(pos, CI[0])
        block["rank_ci_high"] = _nanpercentile(pos, CI[1])
        for k in range(1, len(runs) + 1):
            block[f"share_rank_{k}"] = (pos == k).mean(axis=0)
        rank_blocks.append(block)

        for j, dataset in enumerate(datasets):
            cell = pd.DataFrame(runs, columns=RUN_KEY)
            cell["metric"] = metric
            cell["dataset"] = dataset
            cell["value"] = wide.to_numpy()[:, j]
            cell["ci_low"] = _nanpercentile(samples[:, :, j], CI[0])
            cell["ci_high"] = _nanpercentile(samples[:, :, j], CI[1])
            cell["resampled"] = resampled[:, j]
            interval_blocks.append(cell[cell.value.notna()])
        delta_blocks.append(_deltas(frame, metric, runs, wide, samples, n_samples))

    ranks = pd.concat(rank_blocks, ignore_index=True)
    # Runs of a metric with fewer runs can never take the last positions: share 0, not missing.
    share_cols = [f"share_rank_{k}" for k in range(1, max_runs + 1)]
    ranks[share_cols] = ranks.reindex(columns=share_cols).fillna(0.0)
    intervals = pd.concat(interval_blocks, ignore_index=True)
    deltas = pd.concat(delta_blocks, ignore_index=True).reindex(columns=DELTA_COLUMNS)
    return BootstrapResult(ranks=ranks, intervals=intervals, deltas=deltas)


def _deltas(frame: pd.DataFrame, metric: str, runs: list[tuple], wide: pd.DataFrame, samples: np.ndarray,
            n_samples: int) -> pd.DataFrame:
    """Per run with one scratch reference (the table's `delta_scratch`): the observed difference of
    the means over datasets and its 95% interval over the samples (each mean over the datasets its
    run has, as in the table)."""
    rows = []
    observed = wide.to_numpy()
    seeded = frame[(frame.metric == metric) & frame.fold.str.contains(SEED_MARK, regex=False)]
    seeds = seeded.groupby(RUN_KEY).fold.nunique().to_dict()
    for i, run in enumerate(runs):
        refs = scratch_references(run, runs)
        if len(refs) != 1:
            continue
        j = runs.index(refs[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice": no values in a sample
            diff = np.nanmean(samples[:, i, :], axis=1) - np.nanmean(samples[:, j, :], axis=1)
            delta = np.nanmean(observed[i]) - np.nanmean(observed[j])
        ok = ~np.isnan(diff)
        low, high = (np.percentile(diff[ok], CI) if ok.any() else (np.nan, np.nan))
        rows.append({**dict(zip(RUN_KEY, run)), "metric": metric, "reference": " / ".join(refs[0]),
                     "delta": delta, "ci_low": low, "ci_high": high, "seeds": int(seeds.get(run, 0)),
                     "n_samples": n_samples})
    return pd.DataFrame(rows, columns=DELTA_COLUMNS)



def _resampled_cells(frame: pd.DataFrame, metric: str, runs: list[tuple], datasets: list[str]) -> np.ndarray:
    """runs x datasets: True where the cell has per-case values (so it varies across samples)."""
    has_cases = frame[(frame.metric == metric) & (frame.case != "")]
    present = set(zip(*(has_cases[c] for c in RUN_KEY), has_cases.dataset))
    return np.array([[(*run, d) in present for d in datasets] for run in runs], dtype=bool)
