"""Figures for the benchmark: per-dataset heat map, rank stability, per-dataset bars.

Figures are built on matplotlib's object API with the Agg canvas (no pyplot state, no display
needed). Runs are labelled 'method / architecture / schedule' and coloured by method, the same in
every figure; values are shown in percent. Every text stays inside the canvas whatever the number of
runs and datasets (constrained layout; titles that would be longer than the axes are on their own
lines; tests/test_aggregate.py measures each text's extent).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from openmind_bench.aggregate.ranking import dataset_ranks
from openmind_bench.aggregate.results import RUN_KEY, run_label
from openmind_bench.aggregate.table import METRIC_TITLES, dataset_columns
from openmind_bench.names import SCRATCH

DPI = 120
SCRATCH_COLOUR = "#7f7f7f"


def file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "unnamed"


def method_colours(methods) -> dict[str, str]:
    """Stable colour per method (scratch is grey), so one method looks the same everywhere."""
    others = sorted({m for m in methods if m != SCRATCH})
    palette = colormaps["tab10" if len(others) <= 10 else "tab20"].colors
    palette = [c for c in palette if not np.allclose(c[:3], (0.498, 0.498, 0.498), atol=0.01)]
    colours = {m: palette[i % len(palette)] for i, m in enumerate(others)}
    colours[SCRATCH] = SCRATCH_COLOUR
    return colours


RUN_FORMAT = "method / architecture / schedule"


def _save(fig: Figure, path: Path) -> Figure:
    """Write `fig` as PNG; the returned figure has the saved file's dpi, so measuring it measures the file."""
    fig.set_dpi(DPI)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=DPI)
    return fig


def _default_style(plot):
    """Draw in matplotlib's default style whatever the process set before: the layout is measured for
    it, and nnU-Net's progress plot sets `seaborn.set(font_scale=2.5)` process-wide (a fine-tuning run
    and the tables in one process used to push texts off the canvas)."""
    @functools.wraps(plot)
    def styled(*args, **kwargs):
        with matplotlib.rc_context({k: v for k, v in matplotlib.rcParamsDefault.items() if k != "backend"}):
            return plot(*args, **kwargs)
    return styled


@_default_style
def heatmap(table: pd.DataFrame, metric: str, path: Path) -> Figure:
    """Runs x datasets; cell text = value (%), colour = rank among runs in that column."""
    rows = table[table.metric == metric].reset_index(drop=True)
    datasets = [c for c in dataset_columns(table) if rows[c].notna().any()]
    columns = [*datasets, "mean"]
    values = rows[columns].to_numpy(dtype=float) * 100
    ranks = dataset_ranks(values)
    labels = [run_label(r) for _, r in rows.iterrows()]
    n_runs, n_cols = values.shape

    label_width = 0.075 * max(len(s) for s in labels)
    # At least as wide as the title's longest line, and tall enough for its four lines and the ticks.
    fig = Figure(figsize=(max(2.6 + label_width + 0.85 * n_cols, 5.2), 2.6 + 0.42 * n_runs), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["RdYlGn_r"].with_extremes(bad="#e6e6e6")
    image = ax.imshow(np.ma.masked_invalid(ranks), cmap=cmap, vmin=1, vmax=max(n_runs, 2), aspect="auto")
    for i in range(n_runs):
        for j in range(n_cols):
            if np.isnan(values[i, j]):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="#555555")
            else:
                weight = "bold" if ranks[i, j] == 1 else "normal"
                r, g, b, _ = image.to_rgba(ranks[i, j])
                ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.45 else "black"
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=8, fontweight=weight,
                        color=ink)
    ax.axvline(len(datasets) - 0.5, color="white", linewidth=4)  # sets the mean apart
    ax.set_xticks(range(n_cols), [*datasets, "Mean"], rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n_runs), labels)
    ax.set_xlabel("downstream dataset")
    # A vertical axis title as long as "run (method / ...)" is taller than the axes of a few runs:
    # the axis says "run", the title says what a row label is made of.
    ax.set_ylabel("run")
    ax.tick_params(length=0)
    ax.set_title(
        f"{METRIC_TITLES[metric]} per dataset\nrow: {RUN_FORMAT}\n"
        "cell: mean over cases then folds\ncolour: rank within column (1 = best)",
        fontsize=10,
    )
    bar = fig.colorbar(image, ax=ax, shrink=min(1.0, 0.4 + 0.06 * n_runs), pad=0.02)
    # No label on the bar: a vertical one is longer than the bar of a few runs, a title above it wider
    # than the bar; the figure title says what the colour is.
    bar.ax.invert_yaxis()
    if n_runs <= 12:
        bar.set_ticks(range(1, max(n_runs, 2) + 1))
    return _save(fig, path)


@_default_style
def rank_stability(ranks: pd.DataFrame, metric: str, path: Path) -> Figure:
    """Bubble plot: share of bootstrap samples at each leaderboard position, per run."""
    rows = ranks[ranks.metric == metric].sort_values(["rank_observed", "rank_mean"], kind="stable")
    rows = rows.reset_index(drop=True)
    n_runs = len(rows)
    n_samples = int(rows.n_samples.iloc[0])
    colours = method_colours(ranks.method)
    labels = [run_label(r) for _, r in rows.iterrows()]

    axes_w, axes_h = max(3.5, 0.55 * n_runs), max(3.0, 0.42 * n_runs)
    legend_w = 2.3
    label_h = 0.07 * max(len(s) for s in labels) + 0.8
    fig = Figure(figsize=(axes_w + 1.0 + legend_w, axes_h + label_h + 0.9), layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=[axes_w + 1.0, legend_w])
    ax = fig.add_subplot(grid[0])
    legend_ax = fig.add_subplot(grid[1])
    legend_ax.axis("off")
    # Largest bubble about as wide as one grid cell, but never huge when there are few runs.
    cell_pt = min(45.0, 72 * min(axes_w, axes_h) / (n_runs + 0.4))
    area_full = (0.85 * cell_pt) ** 2
    for i, row in rows.iterrows():
        shares = np.array([row.get(f"share_rank_{k}", 0.0) for k in range(1, n_runs + 1)])
        at = np.flatnonzero(shares > 0)
        ax.scatter(np.full(len(at), i), at + 1, s=shares[at] * area_full, color=colours[row.method],
                   alpha=0.75, edgecolors="black", linewidths=0.4, zorder=2)
        if not np.isnan(row.rank_ci_low):
            ax.vlines(i, row.rank_ci_low, row.rank_ci_high, color="black", linewidth=1, zorder=3)
        ax.scatter([i], [row.rank_observed], marker="x", color="black", s=40, linewidths=1.5, zorder=4)
    ax.set_xticks(range(n_runs), labels, rotation=50, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(1, n_runs + 1))
    ax.set_ylim(n_runs + 0.7, 0.3)
    ax.set_xlim(-0.7, n_runs - 0.3)
    ax.grid(True, color="#dddddd", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    ax.set_xlabel(f"run ({RUN_FORMAT}),\nordered by observed position")
    ax.set_ylabel("leaderboard position by average rank (1 = best)")
    if (rows.datasets_resampled == 0).all():
        note = "no per-case values, so every sample ranks alike"
    else:
        note = f"{n_samples} bootstrap samples of the test cases"
    ax.set_title(f"Rank stability: {METRIC_TITLES[metric]}\n{note}", fontsize=10)
    # Two legends: bubble sizes (spaced by the largest bubble) and method colours.
    biggest = np.sqrt(area_full)
    sizes = [
        Line2D([], [], linestyle="", marker="o", markersize=np.sqrt(s * area_full), markerfacecolor="#bbbbbb",
               markeredgecolor="black", markeredgewidth=0.4, label=f"{s:.0%} of samples")
        for s in (0.1, 0.5, 1.0)
    ]
    sizes += [
        Line2D([], [], linestyle="", marker="x", color="black", markersize=7, label="observed position"),
        Line2D([], [], color="black", linewidth=1, label="95% bootstrap interval"),
    ]
    # Legend rows are (1 + labelspacing) font sizes apart: leave room for the biggest bubble.
    first = legend_ax.legend(handles=sizes, loc="upper left", fontsize=8, borderpad=0.8,
                             labelspacing=max(0.6, biggest / 8 - 0.6), handlelength=max(2.0, biggest / 8),
                             title="share of bootstrap samples", title_fontsize=8)
    legend_ax.add_artist(first)
    methods = sorted(set(rows.method), key=lambda m: (m != SCRATCH, m))
    legend_ax.legend(handles=[Patch(facecolor=colours[m], edgecolor="black", linewidth=0.4, label=m) for m in methods],
                     loc="lower left", fontsize=8, title="method", title_fontsize=8)
    return _save(fig, path)


@_default_style
def dataset_bars(intervals: pd.DataFrame, table: pd.DataFrame, metric: str, dataset: str, path: Path,
                 n_samples: int) -> Figure:
    """One bar per run with its 95% bootstrap interval, for one dataset and metric."""
    cells = intervals[(intervals.metric == metric) & (intervals.dataset == dataset)]
    order = table[table.metric == metric][RUN_KEY].apply(tuple, axis=1).tolist()
    cells = cells.set_index(RUN_KEY).reindex(order).dropna(subset=["value"]).reset_index()
    n = len(cells)
    colours = method_colours(table.method)
    value, low, high = (cells[c].to_numpy(dtype=float) * 100 for c in ("value", "ci_low", "ci_high"))
    labels = [run_label(r) for _, r in cells.iterrows()]
    fixed = ~cells.resampled.to_numpy(dtype=bool)

    fig = Figure(figsize=(7.5 + 0.07 * max(len(s) for s in labels), 2.3 + 0.36 * n), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(n)
    ax.barh(y, value, color=[colours[m] for m in cells.method], edgecolor="black", linewidth=0.4,
            hatch=["//" if f else "" for f in fixed], height=0.7)
    err = np.vstack([value - low, high - value])
    err[:, fixed] = 0
    ax.errorbar(value[~fixed], y[~fixed], xerr=err[:, ~fixed], fmt="none", ecolor="black", elinewidth=1, capsize=3)
    lo, hi = np.nanmin(low), np.nanmax(high)
    pad = max(0.15 * (hi - lo), 0.5)
    left, right = max(0.0, lo - pad), min(100.0, hi + 2.2 * pad)
    ax.set_xlim(left, right)
    for yi, v, h in zip(y, value, high):
        ax.text(min(h, right) + 0.02 * (right - left), yi, f"{v:.2f}", va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.set_ylim(n - 0.4, -0.6)  # first run on top, no empty band
    zoom = " (axis does not start at 0)" if left > 0 else ""
    ax.set_xlabel(f"{metric} (%){zoom}")
    ax.set_ylabel("run")  # what a run label is made of is in the title: a long vertical title outgrows few bars
    ax.grid(True, axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    if fixed.all():
        note = "no per-case values, so no bootstrap interval"
    else:
        note = f"whiskers: 95% interval over {n_samples} bootstrap samples of the cases"
    ax.set_title(f"{dataset}: {METRIC_TITLES[metric]}\nrow: {RUN_FORMAT}; bar: mean over cases then folds\n{note}",
                 fontsize=10)
    handles = [Patch(facecolor=colours[m], edgecolor="black", linewidth=0.4, label=m)
               for m in sorted(set(cells.method), key=lambda m: (m != SCRATCH, m))]
    if fixed.any():
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                             label="held fixed (no per-case values)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="method",
              title_fontsize=8)
    return _save(fig, path)


def write_all(table: pd.DataFrame, ranks: pd.DataFrame, intervals: pd.DataFrame, directory: Path) -> list[Path]:
    """Every figure into `directory` (which must exist); returns the written paths."""
    written = []
    n_samples = int(ranks.n_samples.iloc[0]) if len(ranks) else 0
    for metric in [m for m in METRIC_TITLES if (table.metric == m).any()]:
        stem = file_stem(metric)
        path = directory / f"heatmap_{stem}.png"
        heatmap(table, metric, path)
        written.append(path)
        path = directory / f"rank_stability_{stem}.png"
        rank_stability(ranks, metric, path)
        written.append(path)
        used: set[str] = set()
        for dataset in intervals[intervals.metric == metric].dataset.unique():
            name = file_stem(dataset)
            while name in used:  # two names that differ only in special characters
                name += "_"
            used.add(name)
            path = directory / f"bars_{stem}_{name}.png"
            dataset_bars(intervals, table, metric, dataset, path, n_samples)
            written.append(path)
    return written


@_default_style
def compute_hours(compute: pd.DataFrame, path: Path) -> Figure:
    """GPU-hours (CPU-hours when no run had a GPU) per method x architecture from the compute ledgers,
    pre-training (hatched) and fine-tuning (every dataset, fold and schedule) stacked."""
    from openmind_bench.aggregate.compute import hours_by_method_and_architecture

    hours, unit = hours_by_method_and_architecture(compute)
    hours = hours.sort_index(key=lambda idx: [(m != SCRATCH, m) if isinstance(m, str) else m for m in idx])
    labels = [f"{m} / {a}" for m, a in hours.index]
    colours = method_colours([m for m, _ in hours.index])
    n = len(hours)
    fig = Figure(figsize=(7.5 + 0.07 * max(len(s) for s in labels), 2.3 + 0.36 * n), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(n)
    pre, fine = hours["pretrain"].to_numpy(dtype=float), hours["finetune"].to_numpy(dtype=float)
    colour = [colours[m] for m, _ in hours.index]
    ax.barh(y, pre, color=colour, edgecolor="black", linewidth=0.4, hatch="//", height=0.7)
    ax.barh(y, fine, left=pre, color=colour, edgecolor="black", linewidth=0.4, height=0.7)
    right = float(np.nanmax(pre + fine)) if n else 1.0
    ax.set_xlim(0, 1.25 * right if right > 0 else 1.0)
    for yi, total in zip(y, pre + fine):
        ax.text(total + 0.01 * right, yi, f"{total:.3g}", va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.set_ylim(n - 0.4, -0.6)
    ax.set_xlabel(unit)
    ax.set_ylabel("method / architecture")
    ax.grid(True, axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_title(f"{unit} per method and architecture (compute.json of every run)\n"
                 "hatched: pre-training; plain: fine-tuning, every dataset, fold and schedule", fontsize=10)
    ax.legend(handles=[Patch(facecolor="white", edgecolor="black", hatch="//", label="pre-training"),
                       Patch(facecolor="white", edgecolor="black", label="fine-tuning")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


@_default_style
def probe_curve(history: list[dict], finetune: dict[str, float], path: Path, title: str) -> Figure:
    """Balanced accuracy of the probes during one pre-training run (progress.csv rows: `history`) over
    its epochs, one line per probe dataset x probe; beside it (right panel) the balanced accuracy of
    the runs of its final checkpoint on the test split, fine-tuned or probed (`finetune`: label ->
    value, e.g. 'DemoPatientCls default')."""
    from openmind_bench.names import parse_probe_column

    curves: dict[str, tuple[list, list]] = {}
    for row in history:
        for column, value in row.items():
            parts = parse_probe_column(column)
            if parts is None or parts[2] != "balanced_accuracy" or value in (None, "") or not np.isfinite(float(value)):
                continue
            xs, ys = curves.setdefault(f"{parts[0]} {parts[1]}", ([], []))
            xs.append(int(row["epoch"]))
            ys.append(100 * float(value))
    fig = Figure(figsize=(8.5 + 0.05 * max([len(k) for k in finetune] or [0]), 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True, width_ratios=[3, 1])
    colours = colormaps["tab10"].colors
    for i, (label, (xs, ys)) in enumerate(sorted(curves.items())):
        left.plot(xs, ys, marker="o", markersize=3, color=colours[i % 10], label=label)
    left.set_xlabel("pre-training epoch")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("balanced accuracy (%)")
    left.set_ylim(0, 103)  # a line at 100 stays visible
    left.grid(True, color="#dddddd", linewidth=0.6)
    if curves:
        left.legend(fontsize=8, loc="lower right", title="probe (out-of-fold, training cases)", title_fontsize=8)
    else:
        left.text(0.5, 0.5, "no probe scores", ha="center", va="center", transform=left.transAxes)
    left.set_title(f"probes during pre-training: {title}", fontsize=10)
    labels = sorted(finetune)
    y = [100 * float(finetune[k]) for k in labels]
    right.scatter(range(len(labels)), y, color="black", zorder=3)
    for xi, yi in enumerate(y):
        right.annotate(f"{yi:.1f}", (xi, yi), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=8)
    right.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    right.set_xlim(-0.7, max(len(labels), 1) - 0.3)
    right.grid(True, axis="y", color="#dddddd", linewidth=0.6)
    right.set_title("final checkpoint's rows\n(dataset schedule, test)" if labels else "no fine-tuning\nresults yet",
                    fontsize=9)
    return _save(fig, path)


def probe_curves(runs: dict[str, tuple[list[dict], dict[str, float]]], directory: Path) -> list[Path]:
    """probe_curve_{pre-training run}.png for every run of `runs` (run -> (progress rows, fine-tuning
    scores)) whose progress has probe scores."""
    written = []
    for run, (history, finetune) in sorted(runs.items()):
        path = directory / f"probe_curve_{file_stem(run)}.png"
        probe_curve(history, finetune, path, run)
        written.append(path)
    return written
