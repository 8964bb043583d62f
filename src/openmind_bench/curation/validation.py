"""The curation thresholds against the demo's ground truth: how far apart the planted near-duplicates,
the other contrasts and sessions of one subject, and other subjects lie under the fingerprint, and the
precision and recall of the planted duplicates at a threshold.

Every 3D image the demo builder wrote (its ground truth; injected faults and 4D DWI series left out)
goes through the pre-training images' preprocessing (`preprocess.image.preprocess_image`) and
`curation.fingerprint`, as the workflow's shard jobs do. Each pair of images gets one kind:

- `planted duplicate`: a pair of `ground_truth.json` `planted_duplicates` (the positives);
- `same subject, other contrast` / `same subject, other session`: one subject's images that are not
  copies of each other (the hardest negatives);
- `other subject, same contrast` / `other subject, other contrast`.

`benchmarks/curation_neighbours.py --demo` prints the table (docs/stages.md, Curation by content);
tests/test_curation_content.py holds the thresholds of config/schema.yaml to it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from openmind_bench.curation.fingerprint import FingerprintSettings, fingerprint

PLANTED = "planted duplicate"
KINDS = (PLANTED, "same subject, other contrast", "same subject, other session", "other subject, same contrast",
         "other subject, other contrast")
_ENTITIES = re.compile(r"^(?P<dataset>[^/]+)/sub-(?P<subject>[^/_]+)/(?:ses-(?P<session>[^/_]+)/)?")


def demo_images(truth: dict, only: Sequence[str] | None = None) -> pd.DataFrame:
    """(path, dataset, subject, session, modality) of the demo's 3D images (relative paths), sorted;
    `only` restricts them to those paths."""
    rows = []
    for rel, info in truth["images"].items():
        if info.get("modality") == "DWI" or (only is not None and rel not in only):
            continue
        m = _ENTITIES.match(rel)
        if m is None:
            raise ValueError(f"demo ground truth: {rel!r} is not dataset/sub-X/[ses-Y/]...")
        rows.append({"path": rel, "dataset": m["dataset"], "subject": m["subject"], "session": m["session"] or "",
                     "modality": info["modality"]})
    return pd.DataFrame(rows, columns=["path", "dataset", "subject", "session", "modality"]).sort_values(
        "path", ignore_index=True)


def fingerprint_files(paths: Sequence[str | Path], preprocess_settings,
                      settings: FingerprintSettings = FingerprintSettings()) -> np.ndarray:
    """The fingerprints of image files after the pre-training preprocessing, as an (N, D) matrix."""
    from openmind_bench.preprocess.image import preprocess_image

    out = []
    for path in paths:
        result = preprocess_image(path, preprocess_settings)
        out.append(fingerprint(result.image[0], result.properties["spacing"], settings))
    return np.asarray(out, np.float32).reshape(len(out), settings.dimension)


def pair_table(images: pd.DataFrame, vectors: np.ndarray, planted: Sequence[dict]) -> pd.DataFrame:
    """Every pair of `images` (rows of demo_images) with its kind and fingerprint distance."""
    duplicates = {frozenset((p["original"], p["copy"])) for p in planted}
    i, j = np.triu_indices(len(images), k=1)
    distance = np.linalg.norm(vectors[i] - vectors[j], axis=1)
    a, b = images.iloc[i].reset_index(drop=True), images.iloc[j].reset_index(drop=True)
    same_subject = (a.dataset == b.dataset) & (a.subject == b.subject)
    same_contrast = a.modality == b.modality
    kind = np.select(
        [[frozenset(p) in duplicates for p in zip(a.path, b.path)], same_subject & ~same_contrast,
         same_subject & same_contrast, same_contrast],
        list(KINDS[:4]), KINDS[4])
    return pd.DataFrame({"a": a.path, "b": b.path, "kind": kind, "distance": distance.astype(float)})


def kind_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Pairs, min, median and max distance per kind (in KINDS order)."""
    table = pairs.groupby("kind").distance.agg(["size", "min", "median", "max"])
    return table.reindex([k for k in KINDS if k in table.index])


def precision_recall(pairs: pd.DataFrame, threshold: float) -> dict:
    """Precision and recall of `distance <= threshold` for the planted duplicates, with the counts."""
    found = pairs.distance <= threshold
    positive = pairs.kind == PLANTED
    tp = int((found & positive).sum())
    return {"threshold": threshold, "found": int(found.sum()), "planted": int(positive.sum()), "true_positives": tp,
            "precision": tp / int(found.sum()) if found.any() else float("nan"),
            "recall": tp / int(positive.sum()) if positive.any() else float("nan")}
