"""DSC and NSD against hand-computed cases (anisotropic spacing, empty masks), classification
metrics, and the metrics.json the aggregation stage reads."""

from __future__ import annotations

import json
import math
import warnings

import nibabel as nib
import numpy as np
import pytest

from openmind_bench.aggregate.collect import CollectError, read_metrics_json
from openmind_bench.metrics import (
    RunIdentity,
    case_metrics,
    classification_document,
    classification_metrics,
    dice,
    evaluate_case_files,
    segmentation_document,
    surface_dice,
    write_metrics,
)


def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_dice_hand_computed_and_nnunet_empty_convention():
    ref = box((10, 10, 10), (0, 0, 0), (4, 5, 5))  # 100 voxels
    pred = box((10, 10, 10), (2, 0, 0), (6, 5, 5))  # 100 voxels, 50 shared
    assert dice(ref, pred) == pytest.approx(2 * 50 / (100 + 100))
    empty = np.zeros_like(ref)
    assert math.isnan(dice(empty, empty))  # both empty: NaN, left out of means
    assert dice(empty, pred) == 0.0 and dice(ref, empty) == 0.0


def test_nsd_empty_masks():
    a = box((12, 12, 12), (2, 2, 2), (6, 6, 6))
    e = np.zeros_like(a)
    assert math.isnan(surface_dice(e, e, (1, 1, 1), 1.0))
    assert surface_dice(e, a, (1, 1, 1), 1.0) == 0.0
    assert surface_dice(a, e, (1, 1, 1), 1.0) == 0.0
    assert surface_dice(a, a, (1.0, 0.7, 3.0), 0.0) == pytest.approx(1.0)


def test_nsd_uses_physical_anisotropic_spacing_per_axis():
    a = box((20, 20, 20), (5, 5, 5), (12, 12, 12))
    shift_x, shift_z = np.roll(a, 1, axis=0), np.roll(a, 1, axis=2)
    aniso = (1.0, 1.0, 3.0)
    # a one-voxel shift along a 1 mm axis keeps every surface point within 1 mm
    assert surface_dice(a, shift_x, aniso, 1.5) == pytest.approx(1.0)
    # along the 3 mm axis the moved faces are 3 mm away: beyond 1.5 mm, within 3 mm
    assert surface_dice(a, shift_z, aniso, 1.5) < 0.9
    assert surface_dice(a, shift_z, aniso, 3.0) == pytest.approx(1.0)
    # the same with the thick axis first: spacing follows the array's axis order
    assert surface_dice(a, shift_x, (3.0, 1.0, 1.0), 1.5) == pytest.approx(surface_dice(a, shift_z, aniso, 1.5))
    assert surface_dice(a, shift_z, (1.0, 1.0, 1.0), 1.5) == pytest.approx(1.0)


def test_nsd_voxel_counts_hand_computed():
    # 7^3 box shifted one slice along z (3 mm), tolerance 1.5 mm, boundary voxels counted: each
    # mask has 7^3 - 5^3 = 218 boundary voxels; those further than 1.5 mm from the other boundary
    # are one whole 7x7 face (49) and the 3x3 centre of the opposite face (9), in both directions.
    a = box((20, 20, 20), (5, 5, 5), (12, 12, 12))
    b = np.roll(a, 1, axis=2)
    assert surface_dice(a, b, (1.0, 1.0, 3.0), 1.5, surface="voxels") == pytest.approx((2 * 218 - 2 * 58) / (2 * 218))


def test_nsd_exact_fractions_from_disjoint_objects():
    # reference: cubes A and B; prediction: A and C, with B and C far from everything. A's
    # surfaces agree, B's and C's are beyond the tolerance, all three surfaces have one area.
    shape = (40, 40, 24)
    A, B, C = box(shape, (2, 2, 2), (6, 6, 6)), box(shape, (28, 2, 2), (32, 6, 6)), box(shape, (2, 28, 16), (6, 32, 20))
    spacing = (0.8, 0.8, 2.5)
    assert surface_dice(A | B, A | C, spacing, 1.0) == pytest.approx(2 / 4)
    assert surface_dice(A | B, A, spacing, 1.0) == pytest.approx(2 / 3)
    assert surface_dice(A | B, A, spacing, 1.0, surface="voxels") == pytest.approx(2 / 3)


def test_cropping_does_not_change_the_nsd():
    import torch
    from monai.metrics import compute_surface_dice

    rng = np.random.default_rng(0)
    from scipy import ndimage

    ref = ndimage.gaussian_filter(rng.random((30, 28, 26)), 2) > 0.52
    pred = ndimage.gaussian_filter(rng.random((30, 28, 26)), 2) > 0.52
    spacing = (1.2, 0.9, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = compute_surface_dice(torch.from_numpy(pred[None, None].astype(np.float32)),
                                      torch.from_numpy(ref[None, None].astype(np.float32)),
                                      [2.0], include_background=True, spacing=list(spacing), use_subvoxels=True)
    assert surface_dice(ref, pred, spacing, 2.0) == pytest.approx(float(direct[0, 0]), abs=1e-6)


def test_case_metrics_average_classes_without_nan():
    ref = np.zeros((16, 16, 16), np.int32)
    ref[2:6, 2:6, 2:6] = 1
    pred = ref.copy()
    pred[2:4, 2:6, 2:6] = 0  # class 1: 32 of 64 found, no false positive
    labels = {"a": 1, "b": 2, "ab": (1, 2)}  # b absent in both: NaN, excluded
    m = case_metrics(ref, pred, labels, (1, 1, 1), 1.0)
    assert m["per_class"]["a"]["DSC"] == pytest.approx(2 * 32 / (64 + 32))
    assert math.isnan(m["per_class"]["b"]["DSC"]) and math.isnan(m["per_class"]["b"]["NSD"])
    assert m["per_class"]["ab"]["DSC"] == m["per_class"]["a"]["DSC"]  # region = union of its labels
    assert m["DSC"] == pytest.approx(m["per_class"]["a"]["DSC"])
    none = case_metrics(np.zeros_like(ref), np.zeros_like(ref), {"b": 2}, (1, 1, 1), 1.0)
    assert math.isnan(none["DSC"]) and math.isnan(none["NSD"])


def test_evaluate_case_files_reads_spacing_from_the_header(tmp_path):
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:12, 5:12, 5:12] = 1
    pred = np.roll(ref, 1, axis=2)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(ref, affine), tmp_path / "ref.nii.gz")
    nib.save(nib.Nifti1Image(pred, affine), tmp_path / "pred.nii.gz")
    m = evaluate_case_files(tmp_path / "ref.nii.gz", tmp_path / "pred.nii.gz", {"background": 0, "x": 1}, 1.5)
    assert list(m["per_class"]) == ["x"]  # background is not scored
    assert m["NSD"] == pytest.approx(surface_dice(ref > 0, pred > 0, (1, 1, 3), 1.5))
    assert m["NSD"] < 0.9
    nib.save(nib.Nifti1Image(pred, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "other.nii.gz")
    with pytest.raises(ValueError, match="not on the grid"):
        evaluate_case_files(tmp_path / "ref.nii.gz", tmp_path / "other.nii.gz", {"x": 1}, 1.5)


def test_classification_metrics_hand_computed():
    y = [0, 0, 0, 1, 1]
    p1 = np.array([0.1, 0.4, 0.6, 0.7, 0.3])  # positives' scores 0.7, 0.3 vs negatives 0.1, 0.4, 0.6
    p = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(y, p)
    # recall: class 0 2/3 (0.6 misread), class 1 1/2
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # AUROC: pairs (pos, neg) ranked right: 0.7 beats all 3, 0.3 beats 0.1 -> 4 of 6
    assert m["AUROC"] == pytest.approx(4 / 6)
    single = classification_metrics([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]))
    assert math.isnan(single["AUROC"]) and single["balanced_accuracy"] == pytest.approx(0.5)
    three = classification_metrics([0, 1, 2], np.eye(3))
    assert three == {"balanced_accuracy": 1.0, "AUROC": 1.0}
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1, got \[0, 3\]"):
        classification_metrics([0, 3], np.eye(2))


def test_segmentation_metrics_json_is_what_aggregation_reads(tmp_path):
    ref = np.zeros((12, 12, 12), np.int32)
    ref[3:7, 3:7, 3:7] = 1
    cases = {
        "case_b": case_metrics(ref, ref, {"lesion": 1}, (1, 1, 1), 1.0),
        "case_a": case_metrics(np.zeros_like(ref), np.zeros_like(ref), {"lesion": 1}, (1, 1, 1), 1.0),
    }
    run = RunIdentity(dataset="D1", method="mae", architecture="resenc_l", fold=0, schedule="sawtooth",
                      run="mae__resenc_l__openmind__sawtooth__150", selection="openmind", epochs=150)
    doc = segmentation_document(run, cases, 1.0)
    path = tmp_path / "D1" / run.run / "fold_0" / "metrics.json"
    write_metrics(doc, path, path.with_suffix(".csv"))
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["cases"][0] == {
        "case": "case_a", "DSC": None, "NSD": None,
        "per_class": {"lesion": {"DSC": None, "NSD": None, "tp": 0, "fp": 0, "fn": 0}}}
    parsed = read_metrics_json(path)
    assert parsed["run"]["schedule"] == "sawtooth" and parsed["run"]["fold"] == "0"
    assert sorted(parsed["rows"]) == [("DSC", 1.0, "case_b"), ("NSD", 1.0, "case_b")]
    assert parsed["skipped"] == 2  # case_a's NaN DSC and NSD are left out
    assert path.with_suffix(".csv").read_text().splitlines() == [
        "case,DSC,NSD,DSC:lesion,NSD:lesion", "case_a,,,,", "case_b,1.0,1.0,1.0,1.0"]
    assert doc["summary"]["DSC"] == 1.0 and doc["summary"]["n_cases_without_value"] == 1


def test_classification_metrics_json_and_run_identity(tmp_path):
    run = RunIdentity(dataset="ABI", method="scratch", architecture="resenc_l", fold="test", epochs=200)
    doc = classification_document(run, ["s2", "s1", "s3"], [1, 0, 1], np.array([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4]]),
                                  ["control", "autism"])
    path = tmp_path / "metrics.json"
    write_metrics(doc, path, tmp_path / "metrics.csv")
    parsed = read_metrics_json(path)
    assert parsed["run"]["schedule"] == "none"  # scratch runs may omit the schedule
    assert sorted(parsed["rows"]) == [("AUROC", 1.0, ""), ("balanced_accuracy", 0.75, "")]
    assert [c["case"] for c in doc["cases"]] == ["s1", "s2", "s3"] and doc["cases"][1]["prediction"] == 1
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "case,label,prediction,p:control,p:autism"
    with pytest.raises(ValueError, match="needs a schedule"):
        RunIdentity(dataset="D", method="mae", architecture="resenc_l", fold=0)
    bad = dict(doc, cases=[{"case": "x", "DSC": 1.5}])
    write_metrics(bad, tmp_path / "bad.json")
    with pytest.raises(CollectError, match=r"bad\.json: .*DSC.* = 1\.5 is outside \[0, 1\]"):
        read_metrics_json(tmp_path / "bad.json")


def test_low_data_and_external_checkpoint_identity_round_trip(tmp_path):
    provenance = {"name": "mine", "source": "hf://AnonRes/ResEncL-OpenMind-MAE", "kind": "hf", "revision": None,
                  "commit": "0123456789abcdef0123456789abcdef01234567", "sha256": "ab" * 32,
                  "format": "published repository",
                  "architecture": {"class": "ResidualEncoderUNet", "family": "cnn", "constructor": "resenc_l",
                                   "preset": "ResEncL"},
                  "check": {"moved": 310, "left_new": 48, "unexpected": 0, "finetune_patch_size": [160, 160, 160],
                            "position_embedding": None}}
    run = RunIdentity(dataset="ABI", method="mine", architecture="ResEncL", fold=0, schedule="sawtooth", epochs=150,
                      run="mine__ResEncL__external__sawtooth__150__n20", low_data_n=20, external_checkpoint=provenance)
    doc = classification_document(run, ["s1", "s2"], [0, 1], np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])
    write_metrics(doc, tmp_path / "metrics.json")
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["low_data_n"] == 20 and written["external_checkpoint"] == provenance  # null revision kept
    assert "selection" not in written
    parsed = read_metrics_json(tmp_path / "metrics.json")["run"]
    assert parsed["low_data_n"] == 20 and parsed["external_checkpoint"]["sha256"] == "ab" * 32
    # Our own full-data runs write neither field, so earlier readers see what they always saw.
    plain = classification_document(RunIdentity(dataset="ABI", method="scratch", architecture="ResEncL", fold=0),
                                    ["s1"], [0], np.array([[0.9, 0.1]]), ["a", "b"])
    assert "low_data_n" not in plain and "external_checkpoint" not in plain


@pytest.mark.parametrize("fields, message", [
    ({"low_data_n": 0}, "low_data_n must be a positive integer"),
    ({"low_data_n": "20"}, "low_data_n must be a positive integer"),
    ({"external_checkpoint": "hf://x/y"}, "must be an object with a source"),
    ({"external_checkpoint": {"name": "mine"}}, "must be an object with a source"),
    ({"external_checkpoint": {"name": "other", "source": "/c.pth"}}, "name 'other' is not the method 'mine'"),
])
def test_run_identity_rejects_bad_low_data_and_external_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        RunIdentity(dataset="D", method="mine", architecture="ResEncL", fold=0, schedule="ft", **fields)
