"""Held-out subjects for the pre-training validation loss (nnssl: 1% of subjects, min 5, max 1000).

Subjects, not images, are held out, so no session of a validation subject is trained on. The
draw is a seeded permutation of the sorted (dataset, subject) keys: the same selection and seed
always give the same split, whatever order the index rows come in.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)



def _validation_defaults() -> dict:
    """`selections[].validation` defaults of config/schema.yaml (nnssl's 1%, min 5, max 1000, seed 0)."""
    from openmind_bench import config

    return config.validate({"selections": [{"name": "x"}]}, config.SCHEMA_PATH)["selections"][0]["validation"]


def validation_subjects(images: pd.DataFrame, fraction: float, min_subjects: int, max_subjects: int,
                        seed: int) -> set[tuple[str, str]]:
    subjects = sorted(set(zip(images.dataset.astype(str), images.subject.astype(str))))
    n = len(subjects)
    if n < 2:
        log.warning("only %d subject(s): the validation loss is computed on the training subjects", n)
        return set()
    n_val = int(np.clip(round(fraction * n), min_subjects, max_subjects))
    n_val = min(n_val, n - 1)  # keep at least one subject to train on
    order = np.random.default_rng(seed).permutation(n)
    return {subjects[i] for i in order[:n_val]}


def split_images(images: pd.DataFrame, settings: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training images, validation images); with a single subject both are the whole table."""
    s = {**_validation_defaults(), **(settings or {})}
    held_out = validation_subjects(images, s["fraction"], s["min_subjects"], s["max_subjects"], s["seed"])
    if not held_out:
        return images, images
    is_val = pd.Series([(d, sub) in held_out for d, sub in zip(images.dataset.astype(str), images.subject.astype(str))],
                       index=images.index)
    log.info("validation: %d of %d subjects held out (%d images)", len(held_out),
             images.groupby(["dataset", "subject"]).ngroups, int(is_val.sum()))
    return images[~is_val], images[is_val]
