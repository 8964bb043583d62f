"""Selections: nnssl's pretrain_data.json schema, filters, the preprocessed twin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from openmind_bench.bids.index import conform
from openmind_bench.curation import (
    PREPROCESSED_TWIN,
    Selection,
    build_collection,
    iter_images,
    read_collection,
    resolve_path,
    run_selection,
)
from openmind_bench.preprocess.shard import MANIFEST_COLUMNS

IMAGES = [
    # image_id, dataset, subject, session, modality, quality score, anat mask, anon mask
    ("ds000001__sub-01_ses-01_T1w", "ds000001", "01", "01", "T1w", 1.5, "m/anat1.nii.gz", "m/anon1.nii.gz"),
    ("ds000001__sub-01_ses-02_T1w", "ds000001", "01", "02", "T1w", 3.5, "", ""),
    ("ds000001__sub-01_ses-01_FLAIR", "ds000001", "01", "01", "FLAIR", np.nan, "", ""),
    ("ds000002__sub-07_T2w", "ds000002", "07", "", "T2w", 2.0, "m/anat7.nii.gz", ""),
    ("ds000002__sub-08_desc-FA_dwi", "ds000002", "08", "", "FA", 4.5, "", ""),
]

# a raw diagnosis from participants.tsv that a spreadsheet would run as a formula
PARTICIPANT_FORMULA = '=HYPERLINK("http://x","y")'


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("curation")
    rows, written = [], []
    for iid, ds, sub, ses, modality, score, anat, anon in IMAGES:
        stem = iid.split("__", 1)[1]
        rows.append({"image_id": iid, "dataset": ds, "subject": sub, "session": ses, "modality": modality,
                     "path": f"data/raw/local/{ds}/sub-{sub}/anat/{stem}.nii.gz", "quality_score": score,
                     "anat_mask": anat, "anon_mask": anon, "age": 30.0 + len(ses), "sex": "F",
                     "manufacturer": "Siemens", "field_strength": 3.0,
                     "diagnosis": PARTICIPANT_FORMULA if ds == "ds000002" else "",
                     "derived_from": f"{ds}__sub-{sub}_dwi" if modality == "FA" else "",
                     "dataset_doi": f"doi:10.18112/openneuro.{ds}.v1.0.0"})
        folder = f"results/preprocessed/{ds}/sub-{sub}/ses-{ses or 'DEFAULT'}/{iid}"
        written.append({"image_id": iid, "dataset": ds, "shard": 0, "subject": sub, "session": ses,
                        "modality": modality, "image": f"{folder}.b2nd", "anon": f"{folder}__anon.b2nd",
                        "anat": f"{folder}__anat.b2nd", "properties": f"{folder}.json", "shape": "10x10x10",
                        "spacing": "1x1x1", "anatomy_mask_source": anat or "default",
                        "anonymization_mask_source": anon or "default", "anatomy_fraction": 1.0,
                        "anonymized_fraction": 0.0})
    index = root / "images.parquet"
    conform(rows).to_parquet(index, index=False)
    manifests = []
    for ds in ("ds000001", "ds000002"):
        m = root / f"{ds}.tsv"
        part = pd.DataFrame([w for w in written if w["dataset"] == ds], columns=MANIFEST_COLUMNS)
        part.to_csv(m, sep="\t", index=False)
        manifests.append(m)
    empty = root / "empty.tsv"
    pd.DataFrame(columns=MANIFEST_COLUMNS).to_csv(empty, sep="\t", index=False)
    return root, index, manifests + [empty]


def run(workspace, cfg, quality=()):
    root, index, manifests = workspace
    out = root / "sel" / cfg["name"]
    chosen = run_selection(cfg, 1, [index], manifests, out / "pretrain_data.json", out / PREPROCESSED_TWIN,
                           out / "images.tsv", quality_tables=quality)
    return chosen, read_collection(out / "pretrain_data.json"), read_collection(out / PREPROCESSED_TWIN)


def test_all_keeps_every_preprocessed_image_in_nnssl_schema(workspace):
    chosen, raw, twin = run(workspace, {"name": "all"})
    assert len(chosen) == len(IMAGES)
    assert raw["collection_name"] == "all" and raw["collection_index"] == 1
    ds = raw["datasets"]["ds000001"]
    assert set(ds) == {"dataset_index", "name", "dataset_info", "subjects"}
    subject = ds["subjects"]["sub-01"]
    assert set(subject) == {"subject_id", "subject_info", "sessions"} and subject["subject_info"]["sex"] == "F"
    session = subject["sessions"]["ses-01"]
    assert set(session) == {"session_id", "session_info", "images"}
    image = next(i for i in session["images"] if i["modality"] == "T1w")
    assert set(image) == {"name", "modality", "image_path", "image_info", "associated_masks"}
    assert image["name"] == "ds000001__sub-01_ses-01_T1w"
    assert image["image_path"].endswith("/anat/sub-01_ses-01_T1w.nii.gz")
    assert image["associated_masks"] == {"anatomy_mask": "m/anat1.nii.gz", "anonymization_mask": "m/anon1.nii.gz"}
    assert image["image_info"]["image_quality_score"] == 1.5 and image["image_info"]["magnetic_field_strength"] == 3.0
    # no session -> nnssl's ses-DEFAULT; missing masks are null
    t2 = raw["datasets"]["ds000002"]["subjects"]["sub-07"]["sessions"]["ses-DEFAULT"]["images"][0]
    assert t2["associated_masks"] == {"anatomy_mask": "m/anat7.nii.gz", "anonymization_mask": None}
    # the twin: same collection, our .b2nd files, masks always present
    twin_t2 = twin["datasets"]["ds000002"]["subjects"]["sub-07"]["sessions"]["ses-DEFAULT"]["images"][0]
    assert twin_t2["image_path"] == "results/preprocessed/ds000002/sub-07/ses-DEFAULT/ds000002__sub-07_T2w.b2nd"
    assert twin_t2["associated_masks"]["anonymization_mask"].endswith("ds000002__sub-07_T2w__anon.b2nd")
    assert twin_t2["associated_masks"]["anatomy_mask"].endswith("ds000002__sub-07_T2w__anat.b2nd")
    fa = twin["datasets"]["ds000002"]["subjects"]["sub-08"]["sessions"]["ses-DEFAULT"]["images"][0]
    assert fa["image_info"]["derived_from"] == "ds000002__sub-08_dwi"
    flair = next(i for i in twin["datasets"]["ds000001"]["subjects"]["sub-01"]["sessions"]["ses-01"]["images"]
                 if i["modality"] == "FLAIR")
    assert "image_quality_score" not in flair["image_info"]  # no score: the key is left out, as nnssl does


def test_images_tsv_neutralises_formula_like_participant_values(workspace):
    chosen, _, _ = run(workspace, {"name": "all_for_people"})
    table = pd.read_csv(workspace[0] / "sel" / "all_for_people" / "images.tsv", sep="\t", dtype=str,
                        keep_default_na=False).set_index("image_id")
    assert table.loc["ds000002__sub-07_T2w", "diagnosis"] == "'" + PARTICIPANT_FORMULA
    assert table.loc["ds000001__sub-01_ses-01_T1w", "diagnosis"] == ""
    assert float(table.loc["ds000001__sub-01_ses-01_T1w", "quality_score"]) == 1.5
    # the returned frame (and the index parquet) keep the true value
    assert chosen.set_index("image_id").loc["ds000002__sub-07_T2w", "diagnosis"] == PARTICIPANT_FORMULA


@pytest.mark.parametrize("cfg,expected", [
    ({"name": "t1", "modalities": ["T1w"]}, {"ds000001__sub-01_ses-01_T1w", "ds000001__sub-01_ses-02_T1w"}),
    ({"name": "d2", "datasets": ["ds000002"]}, {"ds000002__sub-07_T2w", "ds000002__sub-08_desc-FA_dwi"}),
    ({"name": "good", "max_quality_score": 2.0},
     {"ds000001__sub-01_ses-01_T1w", "ds000001__sub-01_ses-01_FLAIR", "ds000002__sub-07_T2w"}),
    ({"name": "good_scored", "max_quality_score": 2.0, "keep_unscored": False},
     {"ds000001__sub-01_ses-01_T1w", "ds000002__sub-07_T2w"}),
])
def test_filters(workspace, cfg, expected):
    chosen, raw, twin = run(workspace, cfg)
    assert set(chosen.image_id) == expected
    assert {r["name"] for r in iter_images(raw)} == expected == {r["name"] for r in iter_images(twin)}


def test_quality_table_overrides_the_index_scores(workspace):
    root = workspace[0]
    q = root / "iqs.tsv"
    pd.DataFrame({"image_id": ["ds000002__sub-07_T2w", "ds000001__sub-01_ses-02_T1w"],
                  "quality_score": [4.9, 1.0]}).to_csv(q, sep="\t", index=False)
    chosen, _, _ = run(workspace, {"name": "q", "max_quality_score": 2.0, "keep_unscored": False}, quality=[q])
    assert set(chosen.image_id) == {"ds000001__sub-01_ses-01_T1w", "ds000001__sub-01_ses-02_T1w"}


def test_empty_selection_is_an_error_naming_it(workspace):
    with pytest.raises(ValueError, match="selection 'none' is empty: none of the 5 preprocessed images is left"):
        run(workspace, {"name": "none", "modalities": ["PET"]})


def test_unknown_selection_key_is_refused():
    with pytest.raises(ValueError, match="max_quality"):
        Selection.from_config({"name": "x", "max_quality": 2})


def test_round_trip_through_iter_images():
    table = pd.DataFrame([{"image_id": "ds000003__sub-1_T1w", "dataset": "ds000003", "subject": "sub-1", "session": "",
                           "modality": "T1w", "img": "/abs/x.b2nd", "anon": "", "anat": None}])
    collection = build_collection(table, 7, "c", "img", "anon", "anat")
    json.dumps(collection)  # serialisable as is
    [row] = list(iter_images(collection))
    assert row == {"collection_name": "c", "dataset": "ds000003", "subject": "sub-1", "session": "ses-DEFAULT",
                   "name": "ds000003__sub-1_T1w", "modality": "T1w", "image_path": "/abs/x.b2nd",
                   "anatomy_mask": None, "anonymization_mask": None,
                   "image_info": {"image_id": "ds000003__sub-1_T1w"}}


def test_resolve_path_expands_nnssl_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("nnssl_preprocessed", str(tmp_path) + "/")
    assert resolve_path("$nnssl_preprocessed/D/x.b2nd") == tmp_path / "D/x.b2nd"
    assert resolve_path("rel/x.b2nd", tmp_path) == tmp_path / "rel/x.b2nd"
    assert resolve_path("/abs/x.b2nd", tmp_path) == Path("/abs/x.b2nd")
    assert resolve_path(None) is None
    monkeypatch.delenv("nnssl_raw", raising=False)
    with pytest.raises(KeyError, match="nnssl_raw"):
        resolve_path("$nnssl_raw/x.nii.gz")
