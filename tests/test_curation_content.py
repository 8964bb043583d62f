"""Curation by content: fingerprints, neighbour search, duplicate clusters, leakage, dedup, balance, summary."""

from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from openmind_bench import config
from openmind_bench.bids.index import conform
from openmind_bench.curation import PREPROCESSED_TWIN, run_selection
from openmind_bench.curation.budget import BalanceError, balance_groups, solve_budget, weights
from openmind_bench.curation.content import duplicate_clusters, leakage_counts, leakage_pairs, run_leakage
from openmind_bench.curation.fingerprint import FingerprintError, FingerprintSettings, fingerprint
from openmind_bench.curation.fingerprints import (read_tables, run_fingerprint_shard, split_test_images,
                                                  write_table)
from openmind_bench.curation.neighbours import pairs_within
from openmind_bench.preprocess.shard import MANIFEST_COLUMNS
from openmind_bench.store.b2nd import StoreSettings, write_array

FS = FingerprintSettings()


@functools.lru_cache(maxsize=None)
def head(seed: int, shape=(90, 100, 90), scale=(1.0, 1.0, 1.0)) -> np.ndarray:
    """A smooth head-like volume of its own per seed: an ellipsoid with low-frequency texture."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32) - np.array(shape, np.float32)[:, None, None, None] / 2
    radii = np.array([35, 42, 38]) * np.array(scale)
    inside = sum((grid[a] / radii[a]) ** 2 for a in range(3)) <= 1
    texture = ndimage.zoom(rng.standard_normal((6, 6, 6)), [s / 6 for s in shape], order=1)[: shape[0], : shape[1], : shape[2]]
    image = inside * np.exp(0.4 * texture)  # non-negative, as MR magnitude images
    return ((image - image.mean()) / image.std()).astype(np.float32)


def distance(a, b, spacing=(2.0, 2.0, 2.0), spacing_b=None) -> float:
    return float(np.linalg.norm(fingerprint(a, spacing, FS) - fingerprint(b, spacing_b or spacing, FS)))


def test_fingerprint_is_a_unit_vector_of_the_documented_size():
    v = fingerprint(head(0), (2.0, 2.0, 2.0))
    assert v.shape == (FS.dimension,) == (511,) and v.dtype == np.float32
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)


def test_copies_are_near_and_other_heads_are_far():
    a = head(0)
    rng = np.random.default_rng(1)
    copies = {
        "rescaled intensities": 3.0 * a + 7.0,
        "translated in a larger box": np.pad(a, ((10, 0), (0, 14), (5, 5)), constant_values=float(a.min())),
        "small crop": a[4:, :, :-3],
        "light noise": a + rng.normal(0, 0.03, a.shape).astype(np.float32),
    }
    threshold = config.section("curation")["duplicate_distance"]
    for what, copy in copies.items():
        assert distance(a, copy) < threshold / 2, what
    # the same content at another voxel size (block means make the fingerprint resolution-free)
    assert distance(a, a[::2, ::2, ::2], (2.0, 2.0, 2.0), (4.0, 4.0, 4.0)) < threshold / 2
    # other heads; the same texture in a head 8-10% larger or smaller along two axes is another head too
    others = [distance(a, head(seed)) for seed in range(2, 6)] + [distance(a, head(0, scale=(1.1, 0.92, 1.0)))]
    assert min(others) > 2 * threshold, others


@pytest.mark.parametrize("image,spacing,message", [
    (np.zeros((20, 20, 20), np.float32), (2, 2, 2), "constant"),
    (np.ones((20, 20, 1), np.float32), (2, 2, 2), "degenerate"),
    (np.full((20, 20, 20), np.nan, np.float32), (2, 2, 2), "non-finite"),
    (np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), (1, 0, 1), "spacing"),
    # dipy's 10^3 example DWI at 2 mm: three fingerprint steps, every map of it alike
    (np.random.default_rng(0).random((10, 10, 10)).astype(np.float32), (2, 2, 2), "too small"),
])
def test_degenerate_images_raise(image, spacing, message):
    with pytest.raises(FingerprintError, match=message):
        fingerprint(image, spacing)


def planted(n=3000, dim=64, pairs=20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = set()
    for a, b in rng.choice(n, size=(pairs, 2), replace=False):
        y = x[a] + rng.normal(0, 0.005, dim).astype(np.float32)
        x[b] = y / np.linalg.norm(y)
        truth.add((min(a, b), max(a, b)))
    return x, truth


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_range_search_finds_exactly_the_planted_pairs(backend):
    x, truth = planted()
    found = pairs_within(x, 0.2, backend=backend, threads=1)
    assert {(int(i), int(j)) for i, j in zip(found.i, found.j)} == truth
    assert (found.i < found.j).all() and (found.distance <= 0.2).all()
    # queries against the index: each query finds itself at distance 0
    q = pairs_within(x, 1e-3, queries=x[:5], backend=backend, threads=1)
    assert set(zip(q.i, q.j)) >= {(k, k) for k in range(5)}


def test_backends_agree_on_distances():
    x, _ = planted(n=500, dim=32, pairs=5, seed=3)
    a = pairs_within(x, 1.2, backend="faiss", threads=1)
    b = pairs_within(x, 1.2, backend="sklearn", threads=1)
    merged = a.merge(b, on=["i", "j"], how="outer", indicator=True)
    # a pair exactly at the radius may fall either side in float32; none further in
    off = merged[merged._merge != "both"]
    assert (off.distance_x.fillna(off.distance_y) > 1.2 - 1e-4).all()
    both = merged[merged._merge == "both"]
    assert np.allclose(both.distance_x, both.distance_y, atol=1e-4)


def rows_of(ids):
    return pd.DataFrame({"image_id": ids, "dataset": [i.split("_")[0] for i in ids],
                         "subject": [i.split("_")[1] for i in ids], "session": "", "modality": "T1w"})


def test_duplicate_clusters_are_connected_components():
    e = np.eye(8, dtype=np.float32)
    x = np.stack([e[0], (e[0] + 0.05 * e[1]), (e[0] + 0.1 * e[1]), e[2], e[2] + 0.04 * e[3], e[4], e[5], e[6]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = ["ds2_s1_c", "ds1_s1_a", "ds1_s2_b", "ds3_s1_d", "ds3_s2_e", "ds4_s1_f", "ds4_s2_g", "ds4_s3_h"]
    clusters = duplicate_clusters(rows_of(ids), x, threshold=0.06)
    assert set(clusters.image_id) == {"ds2_s1_c", "ds1_s1_a", "ds1_s2_b", "ds3_s1_d", "ds3_s2_e"}
    by = clusters.set_index("image_id")
    # a -- c -- b chained at 0.05: one cluster of three, numbered by its first image id
    assert by.loc["ds1_s1_a", "cluster"] == by.loc["ds2_s1_c", "cluster"] == by.loc["ds1_s2_b", "cluster"] == 0
    assert by.loc["ds3_s1_d", "cluster"] == 1 and by.loc["ds1_s1_a", "size"] == 3
    assert by.loc["ds2_s1_c", "datasets"] == "ds1;ds2" and by.loc["ds2_s1_c", "nearest"] == "ds1_s1_a"
    assert by.loc["ds1_s2_b", "subjects"] == "ds1/sub-s1;ds1/sub-s2;ds2/sub-s1"
    assert by.loc["ds1_s2_b", "sessions"] == "ds1/sub-s1/ses-DEFAULT;ds1/sub-s2/ses-DEFAULT;ds2/sub-s1/ses-DEFAULT"
    assert by.loc["ds3_s2_e", "distance"] == pytest.approx(0.04, abs=2e-3)
    assert by.loc["ds1_s1_a", "max_distance"] >= by.loc["ds1_s1_a", "distance"]


def test_fingerprint_shard_records_bad_images_as_rejected(tmp_path):
    store = StoreSettings()
    records = []
    for iid, image in (("ds000001__sub-01_T1w", head(0)), ("ds000001__sub-02_T1w", head(1)),
                       ("ds000001__sub-03_T1w", np.zeros((30, 30, 30), np.float32))):
        path = tmp_path / f"{iid}.b2nd"
        write_array(path, image[None], store)
        records.append({c: "" for c in MANIFEST_COLUMNS} | {
            "image_id": iid, "dataset": "ds000001", "shard": 0, "subject": iid.split("_")[2].split("-")[1],
            "session": "", "modality": "T1w", "image": str(path), "shape": "x".join(map(str, image.shape)),
            "spacing": "2x2x2", "anatomy_fraction": 1.0, "anonymized_fraction": 0.0})
    records.append(dict(records[0], image_id="ds000001__sub-04_T1w", image=str(tmp_path / "gone.b2nd")))
    manifest = tmp_path / "shard-0.tsv"
    pd.DataFrame(records, columns=MANIFEST_COLUMNS).to_csv(manifest, sep="\t", index=False)
    out, rejected = tmp_path / "fp.parquet", tmp_path / "rejected.tsv"
    run_fingerprint_shard(manifest, out, rejected, FS)
    rows, vectors = read_tables([out])
    assert list(rows.image_id) == ["ds000001__sub-01_T1w", "ds000001__sub-02_T1w"] and vectors.shape == (2, 511)
    assert np.allclose(vectors[0], fingerprint(head(0), (2, 2, 2)))
    bad = pd.read_csv(rejected, sep="\t")
    assert set(bad.image) == {"ds000001__sub-03_T1w", "ds000001__sub-04_T1w"} and set(bad.stage) == {"curation"}
    assert bad.set_index("image").loc["ds000001__sub-03_T1w", "reason"].startswith("fingerprint failed")


def test_command_line_verbs(tmp_path):
    from openmind_bench.cli import main

    x, _ = planted(n=50, dim=511, pairs=0, seed=2)
    x[7] = x[3]
    rows = rows_of([f"ds{k % 2}_s{k}_x" for k in range(50)])
    write_table(tmp_path / "pre.parquet", rows, x, 511)
    write_table(tmp_path / "down.parquet", pd.DataFrame({"downstream_dataset": ["D"], "case": ["c"], "channel": ["0"],
                                                         "path": ["p"]}), x[[11]], 511)
    assert main(["duplicates", str(tmp_path / "pre.parquet"), "--out", str(tmp_path / "dup.parquet")]) == 0
    assert sorted(pd.read_parquet(tmp_path / "dup.parquet").image_id) == ["ds1_s3_x", "ds1_s7_x"]
    assert main(["leakage", str(tmp_path / "pre.parquet"), "--downstream", str(tmp_path / "down.parquet"),
                 "--out", str(tmp_path / "leak.tsv")]) == 0
    assert list(pd.read_csv(tmp_path / "leak.tsv", sep="\t").image_id) == ["ds1_s11_x"]


def test_run_content_writes_duplicates_leakage_and_unchecked_in_one_pass(tmp_path):
    from openmind_bench.curation.content import run_content
    from openmind_bench.qc import Rejections

    x, _ = planted(n=30, dim=511, pairs=0, seed=4)
    x[5] = x[9]
    write_table(tmp_path / "a.parquet", rows_of([f"ds1_s{k}_x" for k in range(15)]), x[:15], 511)
    write_table(tmp_path / "b.parquet", rows_of([f"ds2_s{k}_x" for k in range(15, 30)]), x[15:], 511)
    write_table(tmp_path / "d.parquet", pd.DataFrame({"downstream_dataset": ["D"], "case": ["c"], "channel": ["1"],
                                                      "path": ["p"]}), x[[20]], 511)
    part = Rejections("curation")
    part.add("ds2_s99_x", "fingerprint failed: FingerprintError: too small", "ds2")
    part.write(tmp_path / "part.tsv")
    out = {k: tmp_path / f"{k}.out" for k in ("dup", "leak", "unchecked")}
    run_content([tmp_path / "a.parquet", tmp_path / "b.parquet"], [tmp_path / "part.tsv"], [tmp_path / "d.parquet"],
                out["dup"], out["leak"], out["unchecked"], 0.08, 0.08, threads=1)
    assert sorted(pd.read_parquet(out["dup"]).image_id) == ["ds1_s5_x", "ds1_s9_x"]
    assert list(pd.read_csv(out["leak"], sep="\t").image_id) == ["ds2_s20_x"]
    unchecked = pd.read_csv(out["unchecked"], sep="\t")
    assert list(unchecked.image) == ["ds2_s99_x"] and list(unchecked.stage) == ["curation"]


def test_split_test_images_takes_channel_files_of_test_cases(tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"dataset": "X", "train": ["c1"], "test": ["c2", "c10"], "case_files": {
        "c1": {"imagesTr/c1_0000.nii.gz": [1, 1], "labelsTr/c1.nii.gz": [1, 1]},
        "c2": {"imagesTr/c2_0000.nii.gz": [1, 1], "imagesTr/c2_0001.nii.gz": [1, 1], "labelsTr/c2.nii.gz": [1, 1]},
        "c10": {"images/c10_0000.nii.gz": [1, 1]}}}))
    got = split_test_images(split, tmp_path / "src")
    assert got == [("c2", 0, tmp_path / "src/imagesTr/c2_0000.nii.gz"), ("c2", 1, tmp_path / "src/imagesTr/c2_0001.nii.gz"),
                   ("c10", 0, tmp_path / "src/images/c10_0000.nii.gz")]


def test_leakage_pairs_and_counts(tmp_path):
    x, _ = planted(n=200, dim=511, pairs=0, seed=5)
    rows = rows_of([f"ds{k % 3}_s{k}_x" for k in range(200)])
    cases = pd.DataFrame({"downstream_dataset": ["A", "A", "B"], "case": ["a1", "a2", "b1"], "channel": "0",
                          "path": ["p1", "p2", "p3"]})
    cx = np.stack([x[10], -x[0], x[42] + 0.01 * x[43]])
    pre, down, out = tmp_path / "pre.parquet", tmp_path / "down.parquet", tmp_path / "leakage.tsv"
    write_table(pre, rows, x, 511)
    write_table(down, cases, cx / np.linalg.norm(cx, axis=1, keepdims=True), 511)
    found = run_leakage([pre], [down], out, threshold=0.1)
    assert list(zip(found.image_id, found.case)) == [("ds1_s10_x", "a1"), ("ds0_s42_x", "b1")]
    assert leakage_counts(out) == {"A": 1, "B": 1}
    assert leakage_counts(tmp_path / "missing.tsv") == {}
    assert leakage_pairs(rows, x, cases.iloc[:0], cx[:0], 0.1).empty


# ------------------------------------------------------------------ selections: dedup, leakage, summary

IMAGES = [  # image_id, subject, modality, score, voxel mm, sex, age
    ("ds000001__sub-01_T1w", "01", "T1w", 2.0, 1.0, "F", 30.0),
    ("ds000001__sub-01_acq-copy_T1w", "01", "T1w", 1.5, 1.2, "F", 30.0),  # duplicate, better score: kept
    ("ds000001__sub-02_T1w", "02", "T1w", 2.0, 1.0, "M", 40.0),
    ("ds000001__sub-02_acq-hr_T1w", "02", "T1w", 2.0, 0.8, "M", 40.0),  # duplicate, same score, finer: kept
    ("ds000001__sub-03_T2w", "03", "T2w", 1.0, 1.0, None, None),
    ("ds000001__sub-04_T2w", "04", "T2w", 3.0, 1.0, "F", 60.0),  # a downstream test case's copy
]


@pytest.fixture()
def selection_workspace(tmp_path):
    rows, written = [], []
    for iid, sub, modality, score, vox, sex, age in IMAGES:
        rows.append({"image_id": iid, "dataset": "ds000001", "subject": sub, "session": "", "modality": modality,
                     "path": f"raw/{iid}.nii.gz", "quality_score": score, "voxel_x": vox, "voxel_y": vox,
                     "voxel_z": vox, "sex": sex, "age": age, "field_strength": 3.0, "manufacturer": "GE"})
        written.append({c: "" for c in MANIFEST_COLUMNS} | {
            "image_id": iid, "dataset": "ds000001", "shard": 0, "subject": sub, "session": "", "modality": modality,
            "image": f"pre/{iid}.b2nd", "anon": "a", "anat": "b", "properties": "p", "shape": "10x10x10",
            "spacing": "1x1x1", "anatomy_fraction": 1.0, "anonymized_fraction": 0.0})
    index = tmp_path / "images.parquet"
    conform(rows).to_parquet(index, index=False)
    manifest = tmp_path / "shard-0.tsv"
    pd.DataFrame(written, columns=MANIFEST_COLUMNS).to_csv(manifest, sep="\t", index=False)
    clusters = duplicate_clusters(rows_of(["ds000001_01_x"] * 0), np.zeros((0, 4), np.float32), 0.1)
    clusters = pd.DataFrame({"cluster": [0, 0, 1, 1], "image_id": [IMAGES[0][0], IMAGES[1][0], IMAGES[2][0],
                                                                     IMAGES[3][0]]}).reindex(columns=clusters.columns)
    clusters["distance"] = 0.02
    dup = tmp_path / "duplicates.parquet"
    clusters.to_parquet(dup, index=False)
    leak = tmp_path / "leakage.tsv"
    pd.DataFrame([{"image_id": IMAGES[5][0], "dataset": "ds000001", "subject": "04", "session": "", "modality": "T2w",
                   "downstream_dataset": "DemoSet", "case": "case_7", "channel": "0", "distance": 0.01}]).to_csv(
        leak, sep="\t", index=False)
    return tmp_path, index, manifest, dup, leak


def select(ws, cfg, unfingerprinted=()):
    root, index, manifest, dup, leak = ws
    out = root / "sel" / cfg["name"]
    chosen = run_selection(cfg, 1, [index], [manifest], out / "pretrain_data.json", out / PREPROCESSED_TWIN,
                           out / "images.tsv", leakage=leak, duplicates=dup, fingerprint_rejections=unfingerprinted,
                           out_dropped=out / "dropped.tsv", out_summary=out / "summary.json",
                           out_plot=out / "summary.png")
    return chosen, pd.read_csv(out / "dropped.tsv", sep="\t"), json.loads((out / "summary.json").read_text()), out


def test_dedup_keeps_best_score_then_finest_voxels_and_leakage_is_excluded(selection_workspace):
    chosen, dropped, summary, out = select(selection_workspace, {"name": "dedup", "dedup": True})
    assert sorted(chosen.image_id) == sorted([IMAGES[1][0], IMAGES[3][0], IMAGES[4][0]])
    reasons = dropped.set_index("image_id")
    assert reasons.loc[IMAGES[0][0], "step"] == "duplicate" and IMAGES[1][0] in reasons.loc[IMAGES[0][0], "reason"]
    assert reasons.loc[IMAGES[2][0], "step"] == "duplicate" and IMAGES[3][0] in reasons.loc[IMAGES[2][0], "reason"]
    assert reasons.loc[IMAGES[5][0], "step"] == "leakage" and "DemoSet/case_7" in reasons.loc[IMAGES[5][0], "reason"]
    assert summary["images"] == 3 and summary["dropped"] == {"duplicate": 2, "leakage": 1}
    assert summary["subjects"] == 3 and summary["voxels"] == 3000
    assert summary["modalities"] == {"T1w": 2, "T2w": 1} and summary["sex"] == {"F": 1, "M": 1, "missing": 1}
    assert summary["quality_score"]["1"] == 1 and summary["quality_score"]["1.5"] == 1
    assert summary["age"]["missing"] == 1 and summary["field_strength"] == {"3 T": 3}
    assert (out / "summary.png").stat().st_size > 1000
    # without dedup the duplicates stay; the leaked copy never does
    chosen, dropped, summary, _ = select(selection_workspace, {"name": "nodedup"})
    assert len(chosen) == 5 and summary["dropped"] == {"leakage": 1}


def test_images_without_fingerprint_are_left_out(selection_workspace):
    from openmind_bench.qc import Rejections

    part = selection_workspace[0] / "part.tsv"
    rejections = Rejections("curation")
    rejections.add(IMAGES[4][0], "fingerprint failed: FingerprintError: too small", "ds000001")
    rejections.write(part)
    chosen, dropped, summary, _ = select(selection_workspace, {"name": "fp"}, unfingerprinted=[part])
    assert IMAGES[4][0] not in set(chosen.image_id) and summary["dropped"] == {"fingerprint": 1, "leakage": 1}
    assert dropped.set_index("image_id").loc[IMAGES[4][0], "reason"].startswith("not checked for leakage")


def test_leakage_reason_names_the_nearest_case():
    from openmind_bench.curation.select import Selection

    images = rows_of(["ds1_01_a", "ds1_02_b"]).assign(quality_score=1.0)
    leak = pd.DataFrame({"image_id": ["ds1_01_a", "ds1_01_a"], "downstream_dataset": ["X", "Y"],
                         "case": ["far", "near"], "distance": ["0.05", "1e-05"]})  # as read from the TSV: text
    chosen, dropped = Selection("s").apply(images, leakage=leak)
    assert list(chosen.image_id) == ["ds1_02_b"]
    assert dropped.reason.iloc[0] == "copy of downstream test case Y/near (distance 0.000)"


def test_filters_are_recorded_with_their_step(selection_workspace):
    chosen, dropped, summary, _ = select(selection_workspace, {"name": "t1", "modalities": ["T1w"],
                                                               "max_quality_score": 1.5})
    assert sorted(chosen.image_id) == [IMAGES[1][0]]
    assert summary["dropped"] == {"modality": 2, "quality": 3}
    assert set(dropped[dropped.step == "quality"].reason.str.slice(0, 13)) == {"quality score"}


def test_selection_empty_after_leakage_names_the_selection(selection_workspace):
    root, index, manifest, dup, leak = selection_workspace
    table = pd.read_csv(leak, sep="\t")
    pd.concat([table, table.assign(image_id=IMAGES[4][0], subject="03")]).to_csv(leak, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"selection 't2' is empty.*modality: 4, leakage: 2"):
        select(selection_workspace, {"name": "t2", "modalities": ["T2w"]})


# ------------------------------------------------------------------ balanced budgets

def random_table(n, seed):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "dataset": [f"ds{d:06d}" for d in rng.integers(0, 20, n)],
        "modality": rng.choice(["T1w", "T2w", "FLAIR"], n, p=[0.6, 0.3, 0.1]),
        "sex": rng.choice(["F", "M", None], n, p=[0.25, 0.65, 0.1]),
        "age": np.where(rng.random(n) < 0.1, np.nan, rng.uniform(1, 90, n)),
        "quality_score": rng.choice([1.0, 2.0, 3.0, np.nan], n),
    })


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_balance_bounds_hold_on_random_tables(seed):
    images = random_table(400, seed)
    cost = np.random.default_rng(seed).uniform(1, 3, len(images))
    balance = [{"column": "sex", "groups": {"F": [0.4, 0.6], "missing": [0.0, 0.05]}},
               {"column": "age", "bins": [0, 18, 60, 200], "groups": {"[0, 18)": [0.2, 1.0]}, "default": [0.0, 0.6]},
               {"column": "modality", "groups": {"FLAIR": [0.15, 1.0]}}]
    # a time limit keeps the test fast on a hard draw: the pick is then feasible, not proven optimal
    chosen = solve_budget(images, cost, weights(images.quality_score, 3.0), cost.sum() * 0.3, balance=balance,
                          time_limit=5)
    assert len(chosen) > 20
    n = len(chosen)
    sex = balance_groups(chosen, balance[0]).value_counts() / n
    assert 0.4 - 1e-9 <= sex.get("F", 0) <= 0.6 + 1e-9 and sex.get("missing", 0) <= 0.05 + 1e-9
    age = balance_groups(chosen, balance[1]).value_counts() / n
    assert age.get("[0, 18)", 0) >= 0.2 - 1e-9 and all(v <= 0.6 + 1e-9 for k, v in age.items() if k != "[0, 18)")
    assert (chosen.modality == "FLAIR").mean() >= 0.15 - 1e-9
    assert cost[images.index.get_indexer(chosen.index)].sum() <= cost.sum() * 0.3 + 1e-6
    # unbalanced, the same budget picks a different mix (the bounds bind)
    free = solve_budget(images, cost, weights(images.quality_score, 3.0), cost.sum() * 0.3, time_limit=5)
    assert (balance_groups(free, balance[0]).value_counts(normalize=True).get("F", 0) < 0.4
            or (free.modality == "FLAIR").mean() < 0.15)


@pytest.mark.parametrize("spec,message", [
    ({"column": "sex", "groups": {"X": [0.1, 1.0]}}, r"'sex'.*\['X'\] have a minimum share but no image"),
    ({"column": "sex", "groups": {"F": [0.6, 1.0], "M": [0.6, 1.0]}}, r"'sex'.*minimum shares add up to 1.2"),
    ({"column": "sex", "default": [0.0, 0.3]}, r"'sex'.*maximum shares .* add up to 0.9"),
    ({"column": "scanner", "default": [0.0, 0.3]}, r"'scanner' is not an image table column"),
])
def test_infeasible_balance_names_the_column(spec, message):
    images = random_table(50, 0)
    cost = np.ones(len(images))
    with pytest.raises(BalanceError, match=message):
        solve_budget(images, cost, weights(images.quality_score, 3.0), 10, balance=[spec])


def test_missing_values_are_a_group_of_their_own():
    images = pd.DataFrame({"sex": ["F", None, "", np.nan, "M"], "age": [1.0, None, 5.0, 100.0, 300.0]})
    assert list(balance_groups(images, {"column": "sex"})) == ["F", "missing", "missing", "missing", "M"]
    assert list(balance_groups(images, {"column": "age", "bins": [0, 18, 200]})) == [
        "[0, 18)", "missing", "[0, 18)", "[18, 200)", "missing"]


# ------------------------------------------------------------------ the demo's planted duplicates and anatomy

@pytest.mark.parametrize("kind", ["affine", "axis_order", "crop", "gzip_level"])
def test_planted_copies_show_the_same_world_image(kind):
    from openmind_bench.demo.builder import _transform

    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, (12, 14, 16)).astype(np.int16)
    affine = np.array([[2.0, 0.1, 0, -10], [0, 2.1, 0.2, 5], [0.1, 0, 1.9, 3], [0, 0, 0, 1]])
    new, new_affine = _transform(kind, data, affine)
    # every voxel of the copy lands where the original holds the same value (or, moved origin: shifted)
    shift = np.array([23.5, -17.0, 11.0]) if kind == "affine" else np.zeros(3)
    for index in [(0, 0, 0), (3, 5, 7), tuple(s - 1 for s in new.shape)]:
        world = new_affine @ np.r_[index, 1.0]
        old = np.linalg.solve(affine, np.r_[world[:3] - shift, 1.0])[:3]
        assert np.allclose(old, np.round(old), atol=1e-6)
        assert new[index] == data[tuple(int(round(v)) for v in old)]
    assert (new.shape == data.shape) == (kind in ("affine", "gzip_level"))


def test_planted_names_and_noise():
    from openmind_bench.demo.builder import _copy_name, _transform

    assert _copy_name("ds1/sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz", "noisy") == \
        "ds1/sub-01/ses-01/anat/sub-01_ses-01_acq-noisy_T1w.nii.gz"
    data = np.full((8, 8, 8), 500, np.int16)
    noisy, _ = _transform("noise", data, np.eye(4), np.random.default_rng(0))
    assert noisy.dtype == np.int16 and 0 < np.abs(noisy - data).mean() < 10  # 1% of the 99.5th percentile


def test_each_subject_has_an_anatomy_of_its_own():
    from openmind_bench.demo.phantom import Head, subject_head

    shape = (40, 44, 40)
    ball = (np.indices(shape) - np.array(shape)[:, None, None, None] / 2)
    inside = (ball ** 2).sum(0) <= 15 ** 2
    field = np.where(inside, np.linspace(0, 1, shape[0])[:, None, None], 0).astype(np.float32)
    base = Head(affine=np.diag([2.0, 2.0, 2.0, 1.0]), t1_brain=field, gm=field, wm=field, brain=inside, csf=field,
                skull=inside, scalp=inside, muscle=inside, eyes=inside, head=inside, face=inside)
    a, truth_a = subject_head(base, np.random.default_rng(1))
    again, _ = subject_head(base, np.random.default_rng(1))
    b, truth_b = subject_head(base, np.random.default_rng(2))
    assert np.array_equal(a.brain, again.brain) and np.array_equal(a.t1_brain, again.t1_brain)
    assert truth_a != truth_b and not np.array_equal(a.brain, b.brain)
    assert abs(int(a.brain.sum()) - int(inside.sum())) < 0.25 * inside.sum()  # scaled by at most 6% per axis
    assert (a.t1_brain[~a.brain] == 0).all()


def test_balance_bounds_only_the_empty_pick_meets_are_an_error_naming_the_columns():
    # each column's bounds are feasible alone; together (every woman is scanned on GE, which may hold at
    # most 40%, women at least 60%) only the empty pick meets them: an error, not a relaxed pick
    images = pd.DataFrame({"dataset": "ds1", "modality": "T1w", "sex": ["F"] * 6 + ["M"] * 6,
                           "manufacturer": ["GE"] * 6 + ["Siemens"] * 6, "quality_score": 2.0})
    balance = [{"column": "sex", "groups": {"F": [0.6, 1.0]}}, {"column": "manufacturer", "groups": {"GE": [0.0, 0.4]}}]
    with pytest.raises(BalanceError, match=r"selection 'x'.*no non-empty pick.*\['sex', 'manufacturer'\]"):
        solve_budget(images, np.ones(12), weights(images.quality_score, 3.0), 12, balance=balance,
                     what="selection 'x'")
    # and through a selection: the same error, before anything is written
    with pytest.raises(BalanceError, match="no non-empty pick"):
        from openmind_bench.curation.select import Selection

        Selection("x", budget={"unit": "voxels", "limit": 1e9, "unscored_weight": 3.0, "balance": balance}).apply(
            images.assign(image_id=[f"i{k}" for k in range(12)], subject=[str(k) for k in range(12)], session="",
                          shape="10x10x10"))


# ------------------------------------------------------------------ the thresholds on the demo's ground truth

# the planted pairs and the nearest non-duplicates of each kind (measured on the whole demo with
# benchmarks/curation_neighbours.py --demo): one subject's other contrasts (ds990002 sub-02 FLAIR lies
# nearest its T1w) and session, other subjects in the same contrast
DEMO_NEGATIVES = ["ds990002/sub-02/anat/sub-02_FLAIR.nii.gz", "ds990001/sub-01/ses-02/anat/sub-01_ses-02_T1w.nii.gz",
                  "ds990001/sub-01/ses-01/anat/sub-01_ses-01_T2w.nii.gz", "ds990001/sub-04/ses-01/anat/sub-04_ses-01_T1w.nii.gz",
                  "ds990003/sub-03/anat/sub-03_T1w.nii.gz", "ds990002/sub-04/anat/sub-04_FLAIR.nii.gz"]


def test_demo_planted_duplicates_found_with_full_precision_and_recall(demo_mirror, demo_truth, repo):
    import yaml

    from openmind_bench.curation.validation import PLANTED, demo_images, fingerprint_files, pair_table, precision_recall
    from openmind_bench.preprocess.image import PreprocessSettings

    planted = demo_truth["planted_duplicates"]
    assert {p["original"].split("/")[0] for p in planted} == {"ds990001", "ds990002", "ds990003"} and len(planted) == 5
    only = {p[k] for p in planted for k in ("original", "copy")} | set(DEMO_NEGATIVES)
    images = demo_images(demo_truth, only)
    assert len(images) == len(only)
    spacing = yaml.safe_load((repo / "config/demo.yaml").read_text())["preprocess"]["spacing"]
    vectors = fingerprint_files([demo_mirror / p for p in images.path], PreprocessSettings(spacing=tuple(spacing)))
    pairs = pair_table(images, vectors, planted)
    threshold = config.section("curation")["duplicate_distance"]
    assert precision_recall(pairs, threshold) | {"threshold": 0} == {
        "threshold": 0, "found": 5, "planted": 5, "true_positives": 5, "precision": 1.0, "recall": 1.0}
    # a margin on both sides: the copies well inside, every kind of non-duplicate well outside
    assert pairs[pairs.kind == PLANTED].distance.max() < threshold / 2
    nearest = pairs[pairs.kind != PLANTED].groupby("kind").distance.min()
    assert set(nearest.index) >= {"same subject, other contrast", "same subject, other session",
                                  "other subject, same contrast"}
    assert (nearest > 1.5 * threshold).all(), nearest


def test_planted_test_case_is_caught_after_the_same_preprocessing(downstream_demo, repo, tmp_path):
    from types import SimpleNamespace

    from openmind_bench.curation.fingerprints import run_downstream_fingerprints
    from openmind_bench.demo.builder import LEAK_SUBJECT, leak_source, save_leak_copy
    from openmind_bench.downstream.splits import SplitSettings, split_dataset
    from openmind_bench.preprocess.image import PreprocessSettings
    from openmind_bench.preprocess.shard import preprocess_row
    from openmind_bench.registry import load_registry

    root, _ = downstream_demo
    registry, name = repo / "config/downstream_demo.yaml", "DemoPatientCls"
    spec = load_registry(registry, root).get(name)
    split = tmp_path / "split.json"
    doc = split_dataset(registry, root, name, SplitSettings(test_fraction=0.25, folds=3), split_out=split)
    leak = leak_source(split, spec.source, name, spec.modalities[0])
    copy = tmp_path / "mirror" / save_leak_copy(leak, tmp_path / "mirror")
    # the pre-training pool: the planted copy and two training cases of the same set (other subjects,
    # the nearest non-copies there are), through the preprocessing shard's own code
    train = [spec.source / next(f for f in sorted(doc["case_files"][c]) if f"{c}_0000." in f)
             for c in sorted(doc["train"])[:2]]
    settings = PreprocessSettings(spacing=(2.0, 2.0, 2.0))
    records = []
    for k, path in enumerate([copy, *train]):
        subject = LEAK_SUBJECT[1] if k == 0 else f"9{k}"
        row = SimpleNamespace(path=str(path), anat_mask="", anon_mask="", image_id=f"{LEAK_SUBJECT[0]}__sub-{subject}",
                              subject=subject, session="", modality=leak["modality"], derived_from="")
        _, record, write = preprocess_row(row, LEAK_SUBJECT[0], 0, tmp_path / "store", settings)
        write()
        records.append(record)
    manifest = tmp_path / "shard-0.tsv"
    pd.DataFrame(records, columns=MANIFEST_COLUMNS).to_csv(manifest, sep="\t", index=False)
    run_fingerprint_shard(manifest, tmp_path / "pool.parquet", tmp_path / "pool_rejected.tsv", FS)
    cases = run_downstream_fingerprints(split, name, spec.source, tmp_path / "down.parquet",
                                        tmp_path / "down_rejected.tsv", settings, FS)
    assert sorted(set(cases.case)) == sorted(doc["test"]) and leak["case"] in set(cases.case)
    found = run_leakage([tmp_path / "pool.parquet"], [tmp_path / "down.parquet"], tmp_path / "leakage.tsv",
                        threshold=config.section("curation")["leakage_distance"])
    assert list(zip(found.image_id, found.downstream_dataset, found.case, found.channel.astype(int))) == [
        (f"{LEAK_SUBJECT[0]}__sub-{LEAK_SUBJECT[1]}", name, leak["case"], 0)]
    assert float(found.distance.iloc[0]) < 0.01


def test_leakage_is_checked_against_every_registry_set_whose_data_is_present(tmp_path, repo):
    from openmind_bench.downstream.settings import dataset_folds, leakage_datasets

    root = tmp_path / "downstream"
    for folder in ("Dataset901_DemoLesionT1", "DemoPatientCls"):  # DemoLesionT1FLAIR's data is absent
        (root / folder).mkdir(parents=True)
    cfg = config.validate({"downstream_registry": str(repo / "config/downstream_demo.yaml"),
                           "downstream": {"root": str(root)}, "finetune": {"datasets": ["DemoPatientCls"]}},
                          config.SCHEMA_PATH)
    assert list(dataset_folds(cfg)) == ["DemoPatientCls"]
    # a set the config does not fine-tune on still keeps its test cases out of every selection
    assert leakage_datasets(cfg) == ["DemoLesionT1", "DemoPatientCls"]
    cfg["curation"]["leakage"] = False
    assert leakage_datasets(cfg) == []
