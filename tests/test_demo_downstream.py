"""The demo downstream sets: files agree with the recorded ground truth, the readers take them as
they are, splits group and balance them, and metrics computed on them reach the aggregation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from openmind_bench.aggregate.collect import read_metrics_json
from openmind_bench.demo.downstream import CLS, SEG_T1, SEG_T1_FLAIR, build_downstream
from openmind_bench.downstream.readers import case_table, read_datasets
from openmind_bench.registry import load_registry
from openmind_bench.downstream.splits import SplitSettings, ensure_split, max_deviation
from openmind_bench.metrics import RunIdentity, evaluate_case_files, segmentation_document, write_metrics


@pytest.fixture(scope="module")
def data(downstream_demo, repo):
    root, _ = downstream_demo
    registry = load_registry(repo / "config" / "downstream_demo.yaml", root=root)
    datasets, errors = read_datasets(registry)
    assert errors == {}
    return datasets


def load(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img


def test_files_match_the_ground_truth(downstream_demo):
    root, truth = downstream_demo
    assert json.loads((root / "ground_truth" / "downstream.json").read_text()) == json.loads(json.dumps(truth))
    for dataset in (SEG_T1, SEG_T1_FLAIR):
        info = truth["datasets"][dataset]
        meta = json.loads((root / dataset / "dataset.json").read_text())
        assert meta["numTraining"] == len(info["cases"]) == 12
        assert list(meta["channel_names"].values()) == info["modalities"]
        for case, c in info["cases"].items():
            label, img = load(root / dataset / "labelsTr" / f"{case}.nii.gz")
            assert list(label.shape) == c["shape"]
            assert np.allclose(img.header.get_zooms()[:3], c["spacing"])
            for name, value in info["labels"].items():
                assert int((label == value).sum()) == c["label_voxels"][name]
            assert (c["label_voxels"]["lesion"] > 0) == c["patient"] == (c["n_lesions"] > 0)
            for ch in range(len(info["modalities"])):
                _, image = load(root / dataset / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
                assert image.shape == label.shape and np.allclose(image.affine, img.affine)
    cls = truth["datasets"][CLS]["cases"]
    assert len(cls) == 16 and {c["label"] for c in cls.values()} == {"patient", "control"}
    assert len({c["subject"] for c in cls.values()}) == 12 and len({c["site"] for c in cls.values()}) == 3


def test_lesions_carry_the_contrast_of_their_modality(downstream_demo):
    root, truth = downstream_demo
    case = next(c for c, v in truth["datasets"][SEG_T1_FLAIR]["cases"].items() if v["patient"])
    label, _ = load(root / SEG_T1_FLAIR / "labelsTr" / f"{case}.nii.gz")
    t1, _ = load(root / SEG_T1_FLAIR / "imagesTr" / f"{case}_0000.nii.gz")
    flair, _ = load(root / SEG_T1_FLAIR / "imagesTr" / f"{case}_0001.nii.gz")
    wm_label, _ = load(root / SEG_T1 / "labelsTr" / f"{next(iter(truth['datasets'][SEG_T1]['cases']))}.nii.gz")
    lesion = label == 1
    around = np.logical_xor(lesion, np.pad(lesion, 2)[2:-2, 2:-2, 2:-2] | lesion) | (
        np.roll(lesion, 3, 0) & ~lesion)  # tissue next to the lesions
    assert flair[lesion].mean() > 1.3 * flair[around].mean()  # bright in FLAIR
    assert t1[lesion].mean() < t1[around].mean()  # dark in T1w
    assert (wm_label == 1).sum() > 5000


def test_readers_take_the_demo_sets_as_written(data, downstream_demo):
    _, truth = downstream_demo
    for name, dataset in (("DemoLesionT1", SEG_T1), ("DemoLesionT1FLAIR", SEG_T1_FLAIR)):
        d = data[name]
        assert d.rejected == [] and len(d.cases) == 12
        table = case_table(d).set_index("case")
        for case, c in truth["datasets"][dataset]["cases"].items():
            assert table.loc[case, "subject"] == c["subject"] and table.loc[case, "site"] == c["site"]
            voxel_ml = float(np.prod(c["spacing"])) / 1000
            assert table.loc[case, "volume_ml:lesion"] == pytest.approx(c["label_voxels"]["lesion"] * voxel_ml, rel=1e-5)
    cls = data["DemoPatientCls"]
    expected = {c: int(v["label"] == "patient") for c, v in truth["datasets"][CLS]["cases"].items()}
    assert {c.case_id: c.target for c in cls.cases} == expected


def test_splits_of_the_demo_sets(data, tmp_path):
    for name, role in (("DemoLesionT1", "dev"), ("DemoLesionT1FLAIR", "test"), ("DemoPatientCls", "test")):
        table = case_table(data[name])
        doc = ensure_split(tmp_path / f"{name}.json", table, name, role, SplitSettings(test_fraction=0.25, folds=3))
        subject = dict(zip(table.case, table.subject))
        assert not {subject[c] for c in doc["train"]} & {subject[c] for c in doc["test"]}
        assert doc["balance_constraints"] == "hard"
        assert all(v <= 2 for v in max_deviation(doc).values())  # at most two sessions per subject
        assert ("folds" in doc) == (role == "dev")
        if name == "DemoPatientCls":
            labels = dict(zip(table.case, table.label))
            assert {labels[c] for c in doc["test"]} == {0, 1}  # both classes in the test set


def test_metrics_on_demo_cases_reach_the_aggregation(data, downstream_demo, tmp_path):
    _, truth = downstream_demo
    d = data["DemoLesionT1"]
    labels = d.spec.labels
    scored = {}
    for case in d.cases[:4]:
        ref, img = load(case.label)
        pred = ref.copy()
        pred[pred == 2] = 1  # a prediction that misses every lesion (as white matter)
        path = tmp_path / f"{case.case_id}.nii.gz"
        nib.save(nib.Nifti1Image(pred.astype(np.uint8), img.affine), str(path))
        scored[case.case_id] = evaluate_case_files(case.label, path, labels, d.spec.nsd_tolerance_mm)
    for case_id, m in scored.items():
        patient = truth["datasets"][SEG_T1]["cases"][case_id]["patient"]
        wm = m["per_class"]["white_matter"]
        assert wm["fn"] == 0
        if patient:  # lesions predicted as white matter: lesion 0, white matter below 1
            assert m["per_class"]["lesion"]["DSC"] == 0.0 and m["per_class"]["lesion"]["NSD"] == 0.0
            assert wm["fp"] > 0 and wm["DSC"] < 1.0
        else:  # no lesion in reference or prediction: NaN, the case mean is white matter alone
            assert np.isnan(m["per_class"]["lesion"]["DSC"]) and m["DSC"] == wm["DSC"] == 1.0
    assert {truth["datasets"][SEG_T1]["cases"][c]["patient"] for c in scored} == {True, False}
    run = RunIdentity(dataset="DemoLesionT1", method="scratch", architecture="resenc_tiny", fold=0, epochs=2,
                      run="scratch__resenc_tiny__2")
    out = tmp_path / "DemoLesionT1" / run.run / "fold_0" / "metrics.json"
    write_metrics(segmentation_document(run, scored, d.spec.nsd_tolerance_mm), out, out.with_suffix(".csv"))
    parsed = read_metrics_json(out)
    assert {case for _, _, case in parsed["rows"]} == set(scored)


def test_build_is_deterministic(downstream_demo, tmp_path):
    root, truth = downstream_demo
    again = build_downstream(tmp_path / "again", seed=0)
    assert again == truth
    case = next(iter(truth["datasets"][SEG_T1_FLAIR]["cases"]))
    for part in (f"labelsTr/{case}.nii.gz", f"imagesTr/{case}_0001.nii.gz"):
        a, _ = load(root / SEG_T1_FLAIR / part)
        b, _ = load(tmp_path / "again" / SEG_T1_FLAIR / part)
        assert np.array_equal(a, b)


def test_truncated_demo_files_go_to_the_rejection_part_and_out_of_the_split(downstream_demo, repo, tmp_path):
    """The issue's case on the real demo set: a half-truncated image (SimpleITK would fill the rest
    with zeros, nnU-Net would score it) and a truncated label file."""
    import shutil

    import pandas as pd

    from openmind_bench.downstream.splits import all_cases, split_dataset

    root, truth = downstream_demo
    shutil.copytree(root / SEG_T1, tmp_path / SEG_T1)
    cases = sorted(truth["datasets"][SEG_T1]["cases"])
    image = tmp_path / SEG_T1 / "imagesTr" / f"{cases[0]}_0000.nii.gz"
    label = tmp_path / SEG_T1 / "labelsTr" / f"{cases[1]}.nii.gz"
    for path, keep in ((image, 0.5), (label, 0.8)):
        whole = path.read_bytes()
        path.write_bytes(whole[: int(len(whole) * keep)])
        nib.load(str(path))  # the header still reads
    part = tmp_path / "qc" / "parts" / "downstream" / "DemoLesionT1.tsv"
    doc = split_dataset(repo / "config" / "downstream_demo.yaml", tmp_path, "DemoLesionT1",
                        SplitSettings(test_fraction=0.25, folds=3), split_out=tmp_path / "split.json",
                        rejected_out=part)
    assert all_cases(doc) == cases[2:]
    rejected = pd.read_csv(part, sep="\t", dtype=str).set_index("image").reason.to_dict()
    assert list(rejected) == [str(label.parent / f"{c}.nii.gz") for c in cases[:2]]
    assert rejected[str(label.parent / f"{cases[0]}.nii.gz")].startswith(f"{image}: truncated: gzip stream ends after")
    assert rejected[str(label)].startswith(f"{label}: truncated: gzip stream ends after")
