"""Splits: every subject in one part, balance constraints met, deterministic, written once."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from openmind_bench.downstream.splits import (
    SplitError,
    SplitSettings,
    balance_features,
    ensure_low_data_subset,
    ensure_split,
    make_split,
    max_deviation,
    partition,
)


@pytest.fixture(scope="module")
def cases() -> pd.DataFrame:
    """36 subjects with 1-3 sessions at three sites; a lesion present in about 60% of cases with
    log-normal volumes, and a second label in about 30%."""
    rng = np.random.default_rng(7)
    rows = []
    for s in range(36):
        site = ("north", "south", "east")[s % 3]
        for session in range(int(rng.integers(1, 4))):
            lesion = int(rng.random() < 0.6)
            oedema = int(rng.random() < 0.3)
            rows.append({"case": f"sub{s:02d}_ses{session}", "subject": f"sub{s:02d}", "site": site,
                         "present:lesion": lesion, "volume_ml:lesion": float(rng.lognormal(1, 1)) * lesion,
                         "present:oedema": oedema, "volume_ml:oedema": float(rng.lognormal(2, 1)) * oedema})
    return pd.DataFrame(rows)


def subject_of(cases):
    return dict(zip(cases.case, cases.subject))


def largest(cases):
    return int(cases.groupby("subject").size().max())


def test_train_test_keeps_subjects_together_and_meets_the_balance_constraints(cases):
    doc = make_split(cases, "X", "test", SplitSettings(test_fraction=0.2, seed=3))
    sub = subject_of(cases)
    train_subjects = {sub[c] for c in doc["train"]}
    test_subjects = {sub[c] for c in doc["test"]}
    assert not train_subjects & test_subjects
    assert sorted(doc["train"] + doc["test"]) == sorted(cases.case)
    assert doc["balance_constraints"] == "hard" and "folds" not in doc
    deviation = max_deviation(doc)
    m = largest(cases)
    assert set(deviation) >= {"cases", "site=north", "site=south", "site=east", "present:lesion",
                              "volume0:lesion", "volume1:lesion", "volume2:lesion", "present:oedema"}
    assert all(v <= m for v in deviation.values()), deviation
    # in this data the optimum is much tighter than the guarantee
    assert sum(deviation.values()) / len(deviation) <= 1.0
    assert abs(len(doc["test"]) - 0.2 * len(cases)) <= m


def test_folds_partition_the_training_part_by_subject(cases):
    doc = make_split(cases, "X", "dev", SplitSettings(folds=4, seed=0))
    sub = subject_of(cases)
    vals = [f["val"] for f in doc["folds"]]
    assert sorted(sum(vals, [])) == sorted(doc["train"])  # every training case validated exactly once
    for fold in doc["folds"]:
        assert sorted(fold["train"] + fold["val"]) == sorted(doc["train"])
        assert not {sub[c] for c in fold["train"]} & {sub[c] for c in fold["val"]}
    assert doc["balance_constraints_folds"] == "hard"
    assert all(v <= largest(cases) for v in max_deviation(doc, "folds").values())
    train, val = partition(doc, 2)
    assert val == doc["folds"][2]["val"] and partition(doc, "test") == (doc["train"], doc["test"])
    with pytest.raises(SplitError, match="fold 4 does not exist"):
        partition(doc, 4)


def test_split_is_deterministic_and_seeded(cases):
    a = make_split(cases, "X", "dev", SplitSettings(folds=3, seed=11))
    b = make_split(cases.sample(frac=1.0, random_state=1), "X", "dev", SplitSettings(folds=3, seed=11))
    assert a == b  # row order of the table does not matter
    c = make_split(cases, "X", "dev", SplitSettings(folds=3, seed=12))
    assert c["test"] != a["test"]


def test_balance_features_volume_tertiles(cases):
    f = balance_features(cases, volume_bins=3)
    present = cases.set_index("case")["present:lesion"] == 1
    bins = f.loc[present.index[present], ["volume0:lesion", "volume1:lesion", "volume2:lesion"]]
    assert (bins.sum(axis=1) == 1).all() and (f.loc[~present, "volume0:lesion"] == 0).all()
    sizes = bins.sum().to_numpy()
    assert sizes.max() - sizes.min() <= 1
    volumes = cases.set_index("case")["volume_ml:lesion"]
    assert volumes[bins.index[bins["volume0:lesion"] == 1]].max() < volumes[bins.index[bins["volume2:lesion"] == 1]].min()


def test_ensure_split_writes_once_and_never_redraws(cases, tmp_path):
    path = tmp_path / "splits" / "X.json"
    first = ensure_split(path, cases, "X", "dev", SplitSettings(folds=3))
    stamp = path.stat().st_mtime_ns
    again = ensure_split(path, cases, "X", "dev", SplitSettings(folds=5, seed=99))  # other settings: still reused
    assert again == first and path.stat().st_mtime_ns == stamp
    assert json.loads(path.read_text())["test"] == first["test"]
    with pytest.raises(SplitError, match=r"X\.json was made for other cases.*never redrawn"):
        ensure_split(path, cases[cases.case != first["test"][0]], "X", "dev")
    with pytest.raises(SplitError, match="belongs to dataset 'X'"):
        ensure_split(path, cases, "Y", "dev")


def test_classification_labels_and_singletons_are_balanced():
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"case": [f"c{i}" for i in range(60)], "subject": [f"c{i}" for i in range(60)],
                          "site": [f"s{i % 4}" for i in range(60)], "label": (rng.random(60) < 0.35).astype(int)})
    doc = make_split(table, "C", "test", SplitSettings(test_fraction=0.25))
    assert len(doc["test"]) == 15
    deviation = max_deviation(doc)
    assert deviation["label=0"] < 1 and deviation["label=1"] < 1  # as close as integer counts allow


def test_low_data_subset(cases, tmp_path):
    split = make_split(cases, "X", "dev", SplitSettings(folds=0))
    singles = cases[cases.subject.map(cases.subject.value_counts()) == 1]
    doc = ensure_low_data_subset(tmp_path / "X_n5.json", singles.assign(), {**split, "train": [
        c for c in split["train"] if c in set(singles.case)]}, 5)
    assert len(doc["train"]) == 5  # single-session subjects: exactly N
    grouped = ensure_low_data_subset(tmp_path / "X_n10.json", cases, split, 10)
    assert abs(len(grouped["train"]) - 10) < largest(cases)
    assert set(grouped["train"]) <= set(split["train"])
    sub = subject_of(cases)
    chosen = {sub[c] for c in grouped["train"]}
    assert all(c in grouped["train"] for c in split["train"] if sub[c] in chosen)  # whole subjects only
    assert ensure_low_data_subset(tmp_path / "X_n10.json", cases, split, 10) == grouped
    with pytest.raises(SplitError, match="N=12"):
        ensure_low_data_subset(tmp_path / "X_n10.json", cases, split, 12)


def test_impossible_splits_are_refused(caplog):
    two = pd.DataFrame({"case": ["a", "b"], "subject": ["s", "s"]})
    with pytest.raises(SplitError, match="cannot fill 2 parts"):
        make_split(two, "T", "test")
    with pytest.raises(SplitError, match="repeat"):
        make_split(pd.DataFrame({"case": ["a", "a"], "subject": ["s", "t"]}), "T", "test")
    with pytest.raises(SplitError, match="test_fraction"):
        SplitSettings(test_fraction=1.0)
    with caplog.at_level(logging.WARNING):
        # one subject holds every lesion case: its part gets all of them, far beyond a hard tolerance of 1
        t = pd.DataFrame({"case": [f"c{i}" for i in range(10)],
                          "subject": ["big"] * 3 + [f"s{i}" for i in range(7)],
                          "present:lesion": [1, 1, 1] + [0] * 7})
        doc = make_split(t, "T", "test", SplitSettings(test_fraction=0.5))
    assert doc["balance_constraints"] in ("hard", "relaxed")
    assert sorted(doc["train"] + doc["test"]) == sorted(t.case)
