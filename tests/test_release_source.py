"""The `openmind_release` source on a small folder in the OpenMind release layout, written here,
then the index built from it: masks and quality scores reach images.parquet."""

from __future__ import annotations

import json
import os
import zlib

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from openmind_bench.bids.index import run_index
from openmind_bench.config import validate
from openmind_bench.qc import Rejections
from openmind_bench.sources import fetch_dataset
from openmind_bench.sources.base import SourceError
from openmind_bench.sources.openmind_release import mask_name, raw_name

DS = "ds000101"
COLUMNS = ["image_path", "anon_mask_path", "anat_mask_path", "modality", "unique_id", "image_quality_score",
           "derived_from", "is_brain_extract", "age", "sex", "handedness", "race", "weight", "bmi",
           "health_status", "manufacturer", "model_name", "magnetic_field_strength", "repetition_time",
           "echo_time", "phase_encoding_direction"]


def _nifti(path, seed, mask=False):
    rng = np.random.default_rng(seed)
    data = (rng.random((12, 12, 10)) > 0.5).astype(np.uint8) if mask else rng.normal(100, 20, (12, 12, 10)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.2, 1.0])), str(path))


def _row(image, modality, anat="", anon="", iqs="", **extra):
    row = dict.fromkeys(COLUMNS, "")
    row.update(image_path=image, modality=modality, anat_mask_path=anat, anon_mask_path=anon,
               image_quality_score=iqs, unique_id=f"{image.split('/')[0]}_{zlib.crc32(image.encode()):08x}")
    row.update(extra)
    return row


def build_release(root):
    """A release folder: OpenMind/dsXXXXXX/... plus openneuro_metadata.csv, with the awkward cases."""
    om = root / "OpenMind"
    d = om / DS
    subject1 = dict(sex="F", handedness="R", health_status="healthy", manufacturer="Siemens",
                    model_name="Prisma", magnetic_field_strength="3.0", repetition_time="2.3", echo_time="0.003")
    rows = []
    for ses, age, seed in (("1", "30", 1), ("2", "31.5", 2)):
        stem = f"sub-01/ses-{ses}/anat/sub-01_ses-{ses}_T1w"
        _nifti(d / f"{stem}.nii.gz", seed)
        _nifti(d / f"{stem}__Data/deface_mask.nii.gz", seed + 10, mask=True)
        _nifti(d / f"{stem}__Data/fb_mask.nii.gz", seed + 20, mask=True)
        rows.append(_row(f"{DS}/{stem}.nii.gz", "T1w", f"{DS}/{stem}__Data/fb_mask.nii.gz",
                         f"{DS}/{stem}__Data/deface_mask.nii.gz", f"{1.2 * int(ses):.1f}", age=age, **subject1))
    # uncompressed image with only an anatomy mask (skull-stripped data need no defacing mask)
    _nifti(d / "sub-02/anat/sub-02_FLAIR.nii", 3)
    _nifti(d / "sub-02/anat/sub-02_FLAIR__Data/fb_mask.nii.gz", 4, mask=True)
    rows.append(_row(f"{DS}/sub-02/anat/sub-02_FLAIR.nii", "FLAIR", f"{DS}/sub-02/anat/sub-02_FLAIR__Data/fb_mask.nii.gz",
                     iqs="4.5", age="62", sex="M", health_status="patient", is_brain_extract="True"))
    # a name that is not BIDS, as in the release (ds004146 has *_UNIT1_denoised.nii.gz)
    _nifti(d / "sub-02/anat/sub-02_UNIT1_denoised.nii.gz", 5)
    rows.append(_row(f"{DS}/sub-02/anat/sub-02_UNIT1_denoised.nii.gz", "UNIT1_denoised", iqs="2.0", age="62"))
    # DWI-derived maps live in the DWI's __Data folder
    for i, m in enumerate(("FA", "MD")):
        _nifti(d / f"sub-03/dwi/sub-03_run-1_dwi__Data/{m}.nii.gz", 6 + i)
        _nifti(d / f"sub-03/dwi/sub-03_run-1_dwi__Data/{m}__Data/fb_mask.nii.gz", 16 + i, mask=True)
        rows.append(_row(f"{DS}/sub-03/dwi/sub-03_run-1_dwi__Data/{m}.nii.gz", m,
                         f"{DS}/sub-03/dwi/sub-03_run-1_dwi__Data/{m}__Data/fb_mask.nii.gz", iqs="3.0", age="25",
                         derived_from=f"{DS}/sub-03/dwi/sub-03_run-1_dwi.nii.gz"))
    # listed but absent; escaping the dataset; a mask in another dataset
    rows.append(_row(f"{DS}/sub-04/anat/sub-04_T1w.nii.gz", "T1w", iqs="1.0"))
    rows.append(_row(f"{DS}/../ds000102/sub-01/anat/sub-01_T1w.nii.gz", "T1w"))
    _nifti(d / "sub-05/anat/sub-05_T2w.nii.gz", 8)
    rows.append(_row(f"{DS}/sub-05/anat/sub-05_T2w.nii.gz", "T2w", anon="ds000102/sub-01/anat/x__Data/deface_mask.nii.gz",
                     iqs="2.5"))
    # a second dataset that does carry its own dataset_description.json and participants.tsv
    d2 = om / "ds000102"
    _nifti(d2 / "sub-01/anat/sub-01_T1w.nii.gz", 9)
    (d2 / "dataset_description.json").write_text(json.dumps(
        {"Name": "x", "BIDSVersion": "1.8.0", "DatasetDOI": "doi:10.18112/openneuro.ds000102.v1.0.0"}))
    (d2 / "participants.tsv").write_text("participant_id\tage\nsub-01\t44\n")
    rows.append(_row("ds000102/sub-01/anat/sub-01_T1w.nii.gz", "T1w", iqs="1.5", age="44"))
    pd.DataFrame(rows, columns=COLUMNS).to_csv(root / "openneuro_metadata.csv", index=False)
    return rows


@pytest.fixture
def release(tmp_path):
    root = tmp_path / "release"
    build_release(root)
    return root


@pytest.fixture
def options(repo, release):
    config = validate({"source": {"kind": "openmind_release", "release_root": str(release)}},
                      repo / "config" / "schema.yaml")
    return config["source"]


def _fetch(options, dest, dataset=DS, snapshot="1.0.0"):
    rejections = Rejections("fetch")
    manifest = fetch_dataset(options, dataset, snapshot, dest, dest / "download_manifest.json", rejections)
    return manifest, rejections


def test_raw_names():
    assert raw_name("sub-01/anat/sub-01_T1w.nii.gz", "T1w") == "sub-01/anat/sub-01_T1w.nii.gz"
    assert raw_name("sub-3/dwi/sub-3_run-1_dwi__Data/FA.nii.gz", "FA") == "sub-3/dwi/sub-3_run-1_FA.nii.gz"
    assert raw_name("sub-3/dwi/sub-3_dwi__Data/mean_b0.nii.gz", "DWI") == "sub-3/dwi/sub-3_desc-meanb0_DWI.nii.gz"
    assert raw_name("sub-2/anat/sub-2_UNIT1_denoised.nii.gz", "UNIT1_denoised") == "sub-2/anat/sub-2_UNIT1denoised.nii.gz"
    assert raw_name("sub-2/anat/sub-2_T1w_final.nii", "T1w") == "sub-2/anat/sub-2_desc-T1wfinal_T1w.nii"
    assert raw_name("anat/scan.nii.gz", "T1w") is None  # no subject: no BIDS name
    assert mask_name("sub-1/anat/sub-1_ses-2_T1w.nii.gz", "anatomy", "x/fb_mask.nii.gz") == \
        "sub-1/anat/sub-1_ses-2_mod-T1w_label-anatomy_mask.nii.gz"


def test_release_dataset_into_raw_tree_and_index(tmp_path, options, repo):
    dest = tmp_path / "raw" / "openmind_release" / DS
    manifest, rejections = _fetch(options, dest)
    paths = {f.path for f in manifest.files}
    assert {
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_mod-T1w_label-anatomy_mask.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_mod-T1w_label-anonymization_mask.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.json",
        "sub-02/anat/sub-02_FLAIR.nii",
        "sub-02/anat/sub-02_mod-FLAIR_label-anatomy_mask.nii.gz",
        "sub-02/anat/sub-02_UNIT1denoised.nii.gz",
        "sub-03/dwi/sub-03_run-1_FA.nii.gz",
        "sub-03/dwi/sub-03_run-1_mod-MD_label-anatomy_mask.nii.gz",
        "sub-01/sub-01_sessions.tsv",
        "dataset_description.json", "participants.tsv", "participants.json", "openmind_release.tsv",
    } <= paths
    assert not any("__Data" in p for p in paths)
    assert all(f.md5 and f.size for f in manifest.files)
    # bytes are the release's
    release = options["release_root"]
    src = f"{release}/OpenMind/{DS}/sub-01/ses-2/anat/sub-01_ses-2_T1w__Data/deface_mask.nii.gz"
    assert (dest / "sub-01/ses-2/anat/sub-01_ses-2_mod-T1w_label-anonymization_mask.nii.gz").read_bytes() == \
        open(src, "rb").read()

    failed = {f["path"]: f["reason"] for f in manifest.failed}
    refused = {r["path"]: r["reason"] for r in manifest.refused}
    assert failed == {f"{DS}/sub-04/anat/sub-04_T1w.nii.gz": "listed in openneuro_metadata.csv but missing under OpenMind/"}
    assert set(refused) == {f"{DS}/../ds000102/sub-01/anat/sub-01_T1w.nii.gz",
                            "ds000102/sub-01/anat/x__Data/deface_mask.nii.gz"}
    assert len(rejections) == 3

    description = json.loads((dest / "dataset_description.json").read_text())
    assert description["SourceDatasets"][1]["URL"].endswith("AnonRes/OpenMind")
    assert manifest.snapshot_match is None  # the release does not say which snapshot it used
    participants = pd.read_csv(dest / "participants.tsv", sep="\t", dtype=str)
    assert participants.set_index("participant_id").loc["sub-01", "age"] == "30"
    assert "31.5" in (dest / "sub-01/sub-01_sessions.tsv").read_text()

    table = pd.read_csv(dest / "openmind_release.tsv", sep="\t", dtype=str, keep_default_na=False)
    fa = table.set_index("path").loc["sub-03/dwi/sub-03_run-1_FA.nii.gz"]
    assert fa.modality == "FA" and fa.release_path.endswith("dwi__Data/FA.nii.gz") and fa.derived_from

    # the index picks up masks and quality scores; masks and sidecars are not taken for images
    out = tmp_path / "index"
    index_rejections = out / "rejected.tsv"
    images = run_index(DS, dest / "download_manifest.json", out / "table.parquet", index_rejections,
                       n_shards=2, modalities=validate({}, repo / "config" / "schema.yaml")["index"]["modalities"],
                       verify_data=True)
    assert pd.read_csv(index_rejections, sep="\t").empty
    rows = images.set_index(images.path.str.split(f"/{DS}/").str[1])
    assert set(rows.index) >= {"sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
                               "sub-02/anat/sub-02_FLAIR.nii", "sub-05/anat/sub-05_T2w.nii.gz"}
    t1 = rows.loc["sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz"]
    assert t1.anat_mask.endswith("sub-01_ses-2_mod-T1w_label-anatomy_mask.nii.gz")
    assert t1.anon_mask.endswith("sub-01_ses-2_mod-T1w_label-anonymization_mask.nii.gz")
    assert os.path.isfile(t1.anat_mask) and os.path.isfile(t1.anon_mask)
    assert t1.quality_score == pytest.approx(2.4)
    assert t1.age == pytest.approx(31.5) and t1.sex == "F" and t1.manufacturer == "Siemens"
    assert t1.repetition_time == pytest.approx(2.3) and t1.field_strength == pytest.approx(3.0)
    flair = rows.loc["sub-02/anat/sub-02_FLAIR.nii"]
    assert flair.anon_mask == "" and flair.anat_mask and flair.quality_score == pytest.approx(4.5)
    assert flair.health_status == "patient"
    t2 = rows.loc["sub-05/anat/sub-05_T2w.nii.gz"]  # its foreign mask was refused, the image stays
    assert t2.anon_mask == "" and t2.quality_score == pytest.approx(2.5)
    assert not rows.path.str.contains("_mask").any()


def test_release_dataset_files_kept_and_snapshot_checked(tmp_path, options):
    dest = tmp_path / "ds000102"
    manifest, rejections = _fetch(options, dest, dataset="ds000102")
    assert manifest.snapshot_match is True and len(rejections) == 0
    assert (dest / "participants.tsv").read_text() == "participant_id\tage\nsub-01\t44\n"
    assert "participants.json" not in {f.path for f in manifest.files}
    with pytest.raises(SourceError, match="snapshot mismatch"):
        _fetch({**options, "on_snapshot_mismatch": "fail"}, dest, dataset="ds000102", snapshot="2.0.0")


def test_rerun_reuses_and_hardlinks(tmp_path, options):
    dest = tmp_path / "copy"
    first, _ = _fetch(options, dest)
    image = dest / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    before = image.stat()
    again, _ = _fetch(options, dest)
    assert again.files == first.files
    assert image.stat().st_ino == before.st_ino and image.stat().st_mtime_ns == before.st_mtime_ns

    linked = tmp_path / "linked"
    _fetch({**options, "link": "hardlink"}, linked)
    src = f"{options['release_root']}/OpenMind/{DS}/sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    assert (linked / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz").stat().st_ino == os.stat(src).st_ino


def test_hugging_face_cache_links_followed_outside_links_refused(tmp_path, repo):
    """A release inside the Hugging Face cache is a tree of links into `blobs/`: they are followed.
    A link that leaves the release (and its cache repository) is refused."""
    repo_dir = tmp_path / "hub" / "datasets--AnonRes--OpenMind"
    plain = tmp_path / "plain"
    build_release(plain)
    snapshot = repo_dir / "snapshots" / "abc123"
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True)
    for path in sorted(plain.rglob("*")):
        if path.is_file():
            rel = path.relative_to(plain)
            blob = blobs / f"{len(list(blobs.iterdir())):04d}"
            path.rename(blob)
            (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / rel).symlink_to(os.path.relpath(blob, (snapshot / rel).parent))
    secret = tmp_path / "secret.nii.gz"
    secret.write_bytes(b"not part of the release")
    t2 = snapshot / "OpenMind" / DS / "sub-05/anat/sub-05_T2w.nii.gz"
    t2.unlink()
    t2.symlink_to(secret)
    config = validate({"source": {"kind": "openmind_release", "release_root": str(snapshot)}},
                      repo / "config" / "schema.yaml")["source"]
    dest = tmp_path / "raw"
    manifest, _ = _fetch(config, dest)
    assert (dest / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz").is_file()
    assert not (dest / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz").is_symlink()
    assert {r["path"]: r["reason"] for r in manifest.refused}[f"{DS}/sub-05/anat/sub-05_T2w.nii.gz"] == \
        "symlink leads outside the release"
    assert not (dest / "sub-05/anat/sub-05_T2w.nii.gz").exists()


def test_missing_release_parts_fail_clearly(tmp_path, options):
    with pytest.raises(SourceError, match="ds000999"):
        _fetch(options, tmp_path / "d", dataset="ds000999")
    with pytest.raises(SourceError, match="openneuro_metadata.csv"):
        _fetch({**options, "release_root": str(tmp_path / "nowhere")}, tmp_path / "d")
