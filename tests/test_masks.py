"""Masks stage: classical masks against the demo's recorded truth and on images no one here made
(nilearn's MNI template, dipy's b0), release-mask checks, bad input, the shard job, the nnU-Net backend."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from openmind_bench import config as cfg
from openmind_bench.bids.index import conform
from openmind_bench.masks.classical import ClassicalSettings, MaskError, compute_masks
from openmind_bench.masks.release import check_polarity
from openmind_bench.masks.shard import merge_index, run_masks_shard

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def settings():
    return cfg.validate({}, REPO / "config" / "schema.yaml")["masks"]


@pytest.fixture(scope="module")
def classical(settings):
    return ClassicalSettings.from_config(settings["classical"])


def dice(a, b):
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def demo_results(demo_mirror, demo_truth, classical):
    """Masks of every demo anatomical image with its true masks: {kind: [(anon dice or share, anat dice)]}."""
    out = {}
    for rel, truth in demo_truth["images"].items():
        if truth["modality"] == "DWI":
            continue
        img = nib.load(str(demo_mirror / rel))
        masks = compute_masks(np.asarray(img.dataobj, np.float32), img.affine, classical)
        anon_t = np.asarray(nib.load(str(demo_mirror / truth["masks"]["anon"])).dataobj) > 0
        anat_t = np.asarray(nib.load(str(demo_mirror / truth["masks"]["anat"])).dataobj) > 0
        head = (anon_t | anat_t).sum()
        anon_score = dice(masks.anon, anon_t) if anon_t.any() else float(masks.anon.sum()) / head
        out.setdefault(truth["anonymisation"], []).append((rel, anon_score, dice(masks.anat, anat_t), masks.kind))
    return out


@pytest.mark.parametrize("kind", ["defaced", "face_blurred", "skull_stripped"])
def test_anonymisation_mask_matches_the_demo_truth(demo_results, kind):
    rows = demo_results[kind]
    assert len(rows) >= 4
    for rel, anon_dice, anat_dice, found in rows:
        assert anon_dice >= 0.8, (rel, anon_dice)
        assert anat_dice >= 0.9, (rel, anat_dice)
        assert found == kind, (rel, found)


def test_intact_heads_get_an_empty_anonymisation_mask(demo_results):
    rows = demo_results["none"]
    assert len(rows) >= 3
    for rel, share, anat_dice, found in rows:
        assert share < 0.01, (rel, share)
        assert anat_dice >= 0.9, (rel, anat_dice)
        assert found == "none"


def _rician(image, sigma, rng):
    return np.sqrt((image + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)


def test_mni_template_defaced_by_the_test(classical):
    from nilearn import datasets

    tpl = datasets.load_mni152_template(resolution=2)
    data = np.asarray(tpl.dataobj, np.float32)
    head = ndi.binary_fill_holes(data > 0.05 * data.max())
    noisy = _rician(data, 0.02 * float(data.max()), np.random.default_rng(0)).astype(np.float32)
    intact = compute_masks(noisy, tpl.affine, classical)
    assert intact.anon.sum() < 0.01 * head.sum()
    assert dice(intact.anat, head) >= 0.9
    # deface: zero the anterior-inferior part of the head (world y > 20 mm, z < 0 mm)
    ijk = np.indices(data.shape).reshape(3, -1)
    xyz = (tpl.affine[:3, :3] @ ijk + tpl.affine[:3, 3:]).reshape((3,) + data.shape)
    region = head & (xyz[1] > 20) & (xyz[2] < 0)
    assert region.sum() > 1000
    defaced = np.where(region, 0.0, noisy).astype(np.float32)
    masks = compute_masks(defaced, tpl.affine, classical)
    assert masks.kind == "defaced"
    assert dice(masks.anon, region) >= 0.8
    assert dice(masks.anat, head & ~region) >= 0.9


def test_dipy_b0_defaced_by_the_test(classical):
    from dipy.data import get_fnames

    img = nib.load(get_fnames(name="aniso_vox"))
    data = np.asarray(img.dataobj, np.float32)
    head = ndi.binary_fill_holes(ndi.gaussian_filter(data, 1) > 0.1 * np.percentile(data, 99))
    intact = compute_masks(data, img.affine, classical)
    assert intact.anon.sum() < 0.01 * head.sum()
    region = head.copy()
    region[:, : data.shape[1] // 3] = False  # a known block: one third of the head along y
    region[:, :, data.shape[2] // 2:] = False
    assert region.sum() > 500
    masks = compute_masks(np.where(region, 0.0, data), img.affine, classical)
    assert dice(masks.anon, region) >= 0.8


@pytest.mark.parametrize("volume, match", [
    (np.zeros((20, 20, 20), np.float32), "constant image"),
    (np.full((20, 20, 20), 7.0, np.float32), "constant image"),
])
def test_images_without_a_head_are_refused(classical, volume, match):
    with pytest.raises(MaskError, match=match):
        compute_masks(volume, np.eye(4), classical)


def test_polarity_check_flags_inverted_masks():
    rng = np.random.default_rng(1)
    image = rng.normal(0, 0.02, (30, 30, 30)).astype(np.float32)
    head = np.zeros(image.shape, bool)
    head[5:25, 5:25, 5:25] = True
    face = head & (np.indices(image.shape)[1] > 20)
    image[head & ~face] += 1.0
    assert check_polarity(image, head & ~face, face, 0.5, 0.5) == []
    problems = check_polarity(image, ~(head & ~face), ~face, 0.5, 0.5)
    assert len(problems) == 2 and all("looks inverted" in p for p in problems)


def _table(tmp_path, rows):
    full = []
    for r in rows:
        full.append({"dataset": "ds000001", "shard": 0, "modality": "T1w", "suffix": "T1w", "n_volumes": 1,
                     "derived_from": "", "anat_mask": "", "anon_mask": "", "session": "", **r})
    path = tmp_path / "images.parquet"
    conform(full).to_parquet(path, index=False)
    return path


def test_shard_job_records_bad_input_and_finishes(tmp_path, settings):
    """A good image gets mask files; an all-zero image, a release mask on another grid and an inverted
    release mask are recorded in the shard's rejection part; the shard finishes."""
    from nilearn import datasets

    tpl = datasets.load_mni152_template(resolution=2)
    data = _rician(np.asarray(tpl.dataobj, np.float32), 2.0, np.random.default_rng(0)).astype(np.float32)
    good = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(data, tpl.affine), good)
    empty = tmp_path / "sub-02_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), empty)
    wrong_grid = tmp_path / "wrong_anon.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), wrong_grid)
    head = ndi.binary_fill_holes(data > 0.1 * data.max())
    inverted = tmp_path / "inverted_anon.nii.gz"
    nib.save(nib.Nifti1Image(head.astype(np.uint8), tpl.affine), inverted)
    table = _table(tmp_path, [
        {"image_id": "ds000001__sub-01_T1w", "subject": "01", "path": str(good)},
        {"image_id": "ds000001__sub-02_T1w", "subject": "02", "path": str(empty)},
        {"image_id": "ds000001__sub-03_T1w", "subject": "03", "path": str(good), "anon_mask": str(wrong_grid)},
        {"image_id": "ds000001__sub-04_T1w", "subject": "04", "path": str(good), "anon_mask": str(inverted)},
    ])
    out = run_masks_shard([table], "ds000001", 0, tmp_path / "masks", tmp_path / "shard.parquet",
                          tmp_path / "rejected.tsv", settings)
    assert set(out.image_id) == {"ds000001__sub-01_T1w", "ds000001__sub-03_T1w", "ds000001__sub-04_T1w"}
    rejected = pd.read_csv(tmp_path / "rejected.tsv", sep="\t")
    assert set(rejected.stage) == {"masks"}
    reasons = dict(zip(rejected.image, rejected.reason))
    assert "constant image" in reasons["ds000001__sub-02_T1w"]
    assert "has shape (10, 10, 10)" in reasons["ds000001__sub-03_T1w"]
    assert "looks inverted" in reasons["ds000001__sub-04_T1w"]
    row = out.set_index("image_id").loc["ds000001__sub-01_T1w"]
    assert row.anat_mask.endswith("sub-01/sub-01_T1w_mask-anatomy.nii.gz")
    anat = nib.load(row.anat_mask)
    assert anat.shape == data.shape and np.allclose(anat.affine, tpl.affine)
    # the masked index: the unmaskable image is left out, the others carry their mask paths
    merged = merge_index([table], [tmp_path / "shard.parquet"], tmp_path / "masked.parquet")
    assert "ds000001__sub-02_T1w" not in set(merged.image_id)
    assert merged.set_index("image_id").loc["ds000001__sub-04_T1w"].anon_mask.endswith("_mask-anonymization.nii.gz")


def test_release_masks_that_pass_are_used_as_shipped(tmp_path, settings):
    from nilearn import datasets

    tpl = datasets.load_mni152_template(resolution=2)
    data = _rician(np.asarray(tpl.dataobj, np.float32), 2.0, np.random.default_rng(0)).astype(np.float32)
    head = ndi.binary_fill_holes(data > 0.1 * data.max())
    face = head & (np.indices(data.shape)[1] > 80)
    data[face] = 0
    image = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(data, tpl.affine), image)
    paths = {}
    for kind, mask in (("anat", head & ~face), ("anon", face)):
        paths[kind] = tmp_path / f"release_{kind}.nii.gz"
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), tpl.affine), paths[kind])
    table = _table(tmp_path, [{"image_id": "ds000001__sub-01_T1w", "subject": "01", "path": str(image),
                               "anat_mask": str(paths["anat"]), "anon_mask": str(paths["anon"])}])
    out = run_masks_shard([table], "ds000001", 0, tmp_path / "masks", tmp_path / "shard.parquet",
                          tmp_path / "rejected.tsv", settings)
    row = out.iloc[0]
    assert (row.anat_mask, row.anon_mask) == (str(paths["anat"]), str(paths["anon"]))
    assert row.anatomy_source == "release" and row.mask_kind == "release"
    assert len(pd.read_csv(tmp_path / "rejected.tsv", sep="\t")) == 0
