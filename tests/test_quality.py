"""Quality stage: MRIQC-style metrics, the 1-5 score (1 best) and its monotonicity under noise, blur and
ghosting, group scores with manual overrides, the shard job and iqs.parquet."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from openmind_bench import config as cfg
from openmind_bench.bids.index import conform
from openmind_bench.masks.classical import ClassicalSettings, compute_masks
from openmind_bench.quality import iqms
from openmind_bench.quality.score import group_scores, image_score
from openmind_bench.quality.shard import IQS_COLUMNS, gather_quality, run_quality_shard

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config():
    return cfg.validate({}, REPO / "config" / "schema.yaml")


@pytest.fixture(scope="module")
def head(config):
    """nilearn's MNI template with scanner-like Rician noise, and its masks."""
    from nilearn import datasets

    tpl = datasets.load_mni152_template(resolution=2)
    data = np.asarray(tpl.dataobj, np.float32)
    data = data / data.max()
    rng = np.random.default_rng(0)
    noisy = np.sqrt((data + rng.normal(0, 0.02, data.shape)) ** 2 + rng.normal(0, 0.02, data.shape) ** 2)
    masks = compute_masks(noisy, tpl.affine, ClassicalSettings.from_config(config["masks"]["classical"]))
    return noisy.astype(np.float32), masks


def test_metric_definitions_on_known_values():
    rng = np.random.default_rng(0)
    values = 10.0 + rng.normal(0, 2.0, 100_000)
    assert iqms.snr(values) == pytest.approx(5.0, rel=0.02)
    # EFC: 0 for all energy in one voxel, 1 for energy spread evenly
    flat = np.ones((10, 10, 10))
    spike = np.zeros((10, 10, 10))
    spike[5, 5, 5] = 1.0
    assert iqms.efc(flat) == pytest.approx(1.0)
    assert iqms.efc(spike) == pytest.approx(0.0, abs=1e-6)
    assert iqms.cjv(1.0, 0.5, 0.1, 0.15) == pytest.approx(0.5)
    assert iqms.cnr(1.0, 0.5, 0.0, 0.3, 0.4) == pytest.approx(1.0)
    fg = np.zeros((4, 4, 4), bool)
    fg[:2] = True
    img = np.where(fg, 3.0, 1.0)
    assert iqms.fber(img, fg, ~fg) == pytest.approx(9.0)
    # FWHM grows with smoothing
    noise = rng.normal(0, 1, (40, 40, 40))
    inside = np.ones(noise.shape, bool)
    assert iqms.fwhm(ndi.gaussian_filter(noise, 2.0), inside) > iqms.fwhm(noise, inside) + 1


def _ghost(image, amount):
    return image + amount * np.roll(image, image.shape[1] // 2, axis=1)


CORRUPTIONS = {
    "noise": lambda img, a, rng: np.abs(img + rng.normal(0, a, img.shape)),
    "blur": lambda img, a, rng: ndi.gaussian_filter(img, a),
    "ghosting": lambda img, a, rng: _ghost(img, a),
}
LEVELS = {"noise": [0.03, 0.06, 0.12], "blur": [0.8, 1.5, 2.5], "ghosting": [0.1, 0.2, 0.4]}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_scores_worsen_monotonically(head, config, corruption):
    image, masks = head
    refs = config["quality"]["references"]
    rng = np.random.default_rng(1)
    scores = [image_score(iqms.compute_iqms(image, masks.anat, masks.anon), refs)]
    for level in LEVELS[corruption]:
        corrupted = CORRUPTIONS[corruption](image, level, rng).astype(np.float32)
        scores.append(image_score(iqms.compute_iqms(corrupted, masks.anat, masks.anon), refs))
    assert all(1.0 <= s <= 5.0 for s in scores)
    assert all(b > a for a, b in zip(scores, scores[1:])), scores


def test_group_score_and_manual_override():
    table = pd.DataFrame({
        "dataset": ["ds000001"] * 3 + ["ds000002"] * 2,
        "modality": ["T1w", "T1w", "T2w", "T1w", "FA"],
        "derivation": ["raw", "raw", "raw", "raw", "FA"],
        "image_score": [1.2, 1.9, 3.6, 2.2, 4.4],
    })
    out = group_scores(table, 0.5, [{"dataset": "ds000002", "modality": "T1w", "score": 1.0}])
    assert out.group_score.tolist() == [1.5, 1.5, 3.5, 2.0, 4.5]
    assert out.quality_score.tolist() == [1.5, 1.5, 3.5, 1.0, 4.5]
    assert math.isnan(out.manual_score[0]) and out.manual_score[3] == 1.0


def test_shard_job_and_gather(tmp_path, head, config):
    from nilearn import datasets

    image, masks = head
    affine = datasets.load_mni152_template(resolution=2).affine
    paths = {}
    for name, arr in (("img", image), ("anat", masks.anat), ("anon", masks.anon)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), paths[name])
    bad = tmp_path / "bad_anat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), affine), bad)
    base = {"dataset": "ds000001", "shard": 0, "modality": "T1w", "suffix": "T1w", "n_volumes": 1, "session": "",
            "derived_from": "", "path": str(paths["img"]), "anon_mask": str(paths["anon"])}
    rows = [{**base, "image_id": "ds000001__sub-01_T1w", "subject": "01", "anat_mask": str(paths["anat"])},
            {**base, "image_id": "ds000001__sub-02_T1w", "subject": "02", "anat_mask": str(bad)}]
    index = tmp_path / "index.parquet"
    conform(rows).to_parquet(index, index=False)
    settings = {**config["quality"], "inu": False}
    part = run_quality_shard([index], "ds000001", 0, tmp_path / "part.parquet", tmp_path / "rej.tsv", settings)
    assert part.image_id.tolist() == ["ds000001__sub-01_T1w"]
    rejected = pd.read_csv(tmp_path / "rej.tsv", sep="\t")
    assert rejected.stage.tolist() == ["quality"] and "has shape (5, 5, 5)" in rejected.reason[0]
    iqs = gather_quality([tmp_path / "part.parquet"], tmp_path / "iqs.parquet", settings)
    assert list(iqs.columns) == IQS_COLUMNS
    row = iqs.iloc[0]
    assert row.derivation == "raw" and 1 <= row.quality_score <= 5 and row.snr > 1
