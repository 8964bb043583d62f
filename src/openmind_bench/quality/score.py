"""The 1-5 image quality score (1 = best, 5 = worst), per image and per dataset x modality x derivation.

Each metric is mapped to a badness in [0, 1] between a `good` and a `bad` reference value
(config `quality.references`; linear, or in log space with `log: true`), the badness values are
averaged with the configured weights over the metrics an image has, and the score is
1 + 4 * badness. OpenMind's released score is one per dataset x modality x derivation (raters
looked at a few images of each): the group score is the median of its images' scores, rounded
to `quality.group_rounding`; config `quality.manual_scores` entries override a group's score.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from openmind_bench.quality.iqms import METRICS


def badness(value: float, good: float, bad: float, log: bool) -> float:
    if value is None or not math.isfinite(value):
        return math.nan
    if log:
        if value <= 0:
            return 1.0 if good > bad else 0.0
        value, good, bad = math.log(value), math.log(good), math.log(bad)
    return float(np.clip((value - good) / (bad - good), 0.0, 1.0))


def image_score(iqms: dict[str, float], references: dict) -> float:
    num = den = 0.0
    for metric in METRICS:
        ref = references.get(metric)
        if not ref or not ref.get("weight", 0):
            continue
        b = badness(iqms.get(metric, math.nan), ref["good"], ref["bad"], ref.get("log", False))
        if math.isnan(b):
            continue
        num += ref["weight"] * b
        den += ref["weight"]
    return 1.0 + 4.0 * num / den if den > 0 else math.nan


def derivation_of(derived_from: str, suffix: str) -> str:
    """`raw` for acquired images, else the derived map's suffix (e.g. FA, ADC)."""
    return "raw" if not derived_from else (suffix or "derived")


def group_scores(table: pd.DataFrame, rounding: float, manual: list[dict]) -> pd.DataFrame:
    """Adds group_score, manual_score and the final quality_score to a per-image table with columns
    dataset, modality, derivation, image_score."""
    table = table.copy()
    med = table.groupby(["dataset", "modality", "derivation"]).image_score.transform("median")
    table["group_score"] = (np.round(med / rounding) * rounding).clip(1, 5) if rounding > 0 else med
    table["manual_score"] = math.nan
    for entry in manual:
        hit = (table.dataset == entry["dataset"]) & (table.modality == entry["modality"])
        if entry.get("derivation"):
            hit &= table.derivation == entry["derivation"]
        table.loc[hit, "manual_score"] = float(entry["score"])
    table["quality_score"] = table.manual_score.where(table.manual_score.notna(), table.group_score)
    return table
