"""Balanced accuracy and AUROC of a classification test set (scikit-learn's implementations).

Both are per-fold quantities, not per-case ones: the metrics file carries them in `summary`, and
each case's label, prediction and class probabilities in `cases` for later re-analysis.

- Balanced accuracy: the mean recall over the classes present in the reference (sklearn's
  `balanced_accuracy_score`), chance level 1 / n_classes.
- AUROC: binary, the score of the positive class (label 1); more classes, one-vs-rest macro
  average of the probabilities. Undefined (NaN, with the reason logged) when the test set holds
  a single class.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


def classification_metrics(labels: Sequence[int], probabilities: np.ndarray, n_classes: int | None = None) -> dict:
    """{"balanced_accuracy", "AUROC"} from true labels (ints 0..C-1) and (N, C) class probabilities.

    The predicted class is the arg-max of the probabilities.
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    y = np.asarray(labels, dtype=int)
    p = np.asarray(probabilities, dtype=float)
    if p.ndim != 2 or p.shape[0] != len(y):
        raise ValueError(f"probabilities must be (n_cases, n_classes) = ({len(y)}, C), got {p.shape}")
    n_classes = int(n_classes or p.shape[1])
    if p.shape[1] != n_classes:
        raise ValueError(f"probabilities have {p.shape[1]} columns for {n_classes} classes")
    if len(y) == 0:
        raise ValueError("no cases to score")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {sorted(set(y.tolist()))}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities contain NaN or Inf")
    predicted = p.argmax(axis=1)
    balanced = float(balanced_accuracy_score(y, predicted))
    present = np.unique(y)
    if len(present) < 2:
        log.warning("AUROC is undefined: the test set holds only class %s", present.tolist())
        auroc = math.nan
    else:
        if len(present) < n_classes:
            log.warning("AUROC averages the %d classes present of %d", len(present), n_classes)
        # probabilities renormalised over the classes present, as roc_auc_score's one-vs-rest needs
        rows = p[:, present] / np.clip(p[:, present].sum(axis=1, keepdims=True), 1e-12, None)
        if len(present) == 2:
            auroc = float(roc_auc_score(y == present[1], rows[:, 1]))
        else:
            auroc = float(roc_auc_score(np.searchsorted(present, y), rows, multi_class="ovr", average="macro"))
    return {"balanced_accuracy": balanced, "AUROC": auroc}
