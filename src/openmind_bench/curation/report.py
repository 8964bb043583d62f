"""What a selection holds: `summary.json` and `summary.png` beside its pretrain_data.json.

Counts of images, subjects, datasets and voxels; the modality mix; histograms of the quality score
and age; sex, field strength and manufacturer distributions (missing values counted as `missing`);
and how many images each step left out (dataset, modality, quality, test_subject, leakage,
duplicate, budget; curation.select). The Snakemake report shows the plots of all selections side by
side (category "Selections").
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from openmind_bench import atomic

QUALITY_BINS = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0001]
AGE_BINS = [0, 2, 6, 12, 18, 30, 45, 60, 75, 200]
MISSING = "missing"


def _counts(values: pd.Series) -> dict[str, int]:
    text = values.astype(object).where(values.notna(), MISSING).astype(str).replace({"": MISSING, "nan": MISSING})
    return {str(k): int(v) for k, v in text.value_counts().sort_index().items()}


def _histogram(values: pd.Series, edges: list[float], label) -> dict[str, int]:
    numeric = pd.to_numeric(values, errors="coerce")
    counts, _ = np.histogram(numeric.dropna().clip(edges[0], edges[-1] - 1e-9), bins=edges)
    out = {label(a, b): int(c) for a, b, c in zip(edges[:-1], edges[1:], counts)}
    out[MISSING] = int(numeric.isna().sum())
    return out


def _voxels(shapes: pd.Series) -> int:
    return int(sum(math.prod(int(v) for v in str(s).split("x")) for s in shapes if str(s)))


def selection_summary(name: str, chosen: pd.DataFrame, dropped: pd.DataFrame, candidates: int) -> dict:
    """The summary.json dict of one selection."""
    subjects = chosen.dataset.astype(str) + "/" + chosen.subject.astype(str)

    def column(c):
        return chosen[c] if c in chosen else pd.Series([None] * len(chosen), index=chosen.index)

    by_step = dropped.groupby("step").image_id.nunique() if len(dropped) else pd.Series(dtype=int)
    return {
        "selection": name,
        "preprocessed_images": int(candidates),
        "images": int(len(chosen)),
        "subjects": int(subjects.nunique()),
        "datasets": int(chosen.dataset.nunique()),
        "voxels": _voxels(column("shape")),
        "modalities": _counts(chosen.modality),
        "quality_score": _histogram(column("quality_score"), QUALITY_BINS,
                                    lambda a, b: f"{a:g}" if b - a <= 0.5 + 1e-3 else f"{a:g}+"),
        "age": _histogram(column("age"), AGE_BINS, lambda a, b: f"[{a:g}, {b:g})" if b < 200 else f"{a:g}+"),
        "sex": _counts(column("sex")),
        "field_strength": _counts(pd.to_numeric(column("field_strength"), errors="coerce").map(
            lambda v: f"{v:g} T", na_action="ignore")),
        "manufacturer": _counts(column("manufacturer")),
        "dropped": {str(k): int(v) for k, v in by_step.items()},
    }


def summary_plot(summary: dict, path: str | Path) -> None:
    """One figure: the modality mix, quality and age histograms, sex, field strength, manufacturer
    and the images each step dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("modalities", "modality"), ("quality_score", "quality score (1 best)"), ("age", "age (years)"),
              ("sex", "sex"), ("field_strength", "field strength"), ("manufacturer", "manufacturer"),
              ("dropped", "dropped, by step")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.2), constrained_layout=True)
    for ax, (key, title) in zip(axes, panels):
        items = summary[key] or {"none": 0}
        ax.bar(range(len(items)), list(items.values()), color="#4c72b0" if key != "dropped" else "#c44e52")
        ax.set_xticks(range(len(items)), list(items.keys()), rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"selection {summary['selection']}: {summary['images']} images, {summary['subjects']} subjects, "
                 f"{summary['datasets']} datasets, {summary['voxels'] / 1e9:.3g} G voxels", fontsize=10)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
