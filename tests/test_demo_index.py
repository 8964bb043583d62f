"""The demo mirror against the BIDS validator, and the index built from it against its ground truth."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from openmind_bench import config as cfg
from openmind_bench.bids.index import COLUMNS, gather, run_index
from openmind_bench.demo import dataset_ids
from openmind_bench.demo.builder import DemoBuilder, _specs
from openmind_bench.qc import Rejections, gather as qc_gather
from openmind_bench.sources import fetch_dataset

VALIDATOR = shutil.which("bids-validator-deno", path=str(Path(sys.executable).parent)) or shutil.which(
    "bids-validator-deno")


@pytest.mark.skipif(VALIDATOR is None, reason="bids-validator-deno is not installed")
@pytest.mark.parametrize("dataset", ["ds990001", "ds990002", "ds990003"])
def test_demo_is_valid_bids_but_for_injected_faults(demo_mirror, demo_truth, dataset):
    proc = subprocess.run([VALIDATOR, "--format", "json", str(demo_mirror / dataset)], capture_output=True,
                          text=True, timeout=300, env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin"})
    report = json.loads(proc.stdout)
    errors = {(i["code"], i.get("location")) for i in report["issues"]["issues"] if i["severity"] == "error"}
    injected = {
        ("DWI_MISSING_BVEC", "/sub-05/ses-01/dwi/sub-05_ses-01_dwi.nii.gz"),
        ("JSON_INVALID", "/sub-04/anat/sub-04_FLAIR.json"),
    }
    assert errors <= injected, errors - injected
    fault_paths = {f["path"] for f in demo_truth["expected_rejections"]}
    for code, location in errors:
        assert any(p.startswith(dataset) and location.split(".")[0][1:] in p for p in fault_paths)


def _validator_errors(tree: Path) -> set[tuple[str, str]]:
    proc = subprocess.run([VALIDATOR, "--format", "json", str(tree)], capture_output=True,
                          text=True, timeout=300, env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin"})
    report = json.loads(proc.stdout)
    return {(i["code"], i.get("location") or "") for i in report["issues"]["issues"] if i["severity"] == "error"}


@pytest.mark.skipif(VALIDATOR is None, reason="bids-validator-deno is not installed")
def test_fetched_tree_bookkeeping_is_not_a_bids_error(indexed, tmp_path):
    """The fetch's manifest and resume state inside data/raw/... are kept out of the BIDS view."""
    fetched = indexed["work"] / "raw" / "local" / "ds990002"
    tree = tmp_path / "ds990002"
    shutil.copytree(fetched, tree)
    (tree / ".fetch_state.json").write_text('{"source": "openneuro", "files": {}}')  # as an S3 fetch leaves it
    assert (tree / "download_manifest.json").is_file()
    errors = _validator_errors(tree)
    ours = {e for e in errors if "download_manifest" in e[1] or "fetch_state" in e[1]}
    assert not ours, ours
    # what is left are the demo's injected faults, as in the mirror itself
    assert errors <= {("JSON_INVALID", "/sub-04/anat/sub-04_FLAIR.json")}, errors
    # and without the .bidsignore the validator does object to the manifest (the check can fail)
    (tree / ".bidsignore").unlink()
    assert any("download_manifest" in location for _, location in _validator_errors(tree))


@pytest.fixture(scope="module")
def indexed(demo_mirror, repo, tmp_path_factory):
    """Fetch (local source) and index every demo dataset as the workflow does."""
    work = tmp_path_factory.mktemp("indexed")
    config = cfg.validate({"source": {"kind": "local", "root": str(demo_mirror)}}, repo / "config" / "schema.yaml")
    table = cfg.read_datasets_table(repo / "config" / "demo_datasets.tsv")
    parts, rejection_parts = [], []
    for d in dataset_ids():
        dest = work / "raw" / "local" / d
        fetch_rej = Rejections("fetch")
        fetch_dataset(config["source"], d, table.loc[d, "snapshot"], dest, dest / "download_manifest.json", fetch_rej)
        fetch_rej.write(work / f"fetch_{d}.tsv")
        n_shards = cfg.num_shards(table.loc[d, "expected_images"], 8)
        run_index(d, dest / "download_manifest.json", work / f"{d}.parquet", work / f"index_{d}.tsv",
                  n_shards=n_shards, modalities=config["index"]["modalities"], verify_data=True)
        parts.append(work / f"{d}.parquet")
        rejection_parts += [work / f"fetch_{d}.tsv", work / f"index_{d}.tsv"]
    n_shards = {d: cfg.num_shards(table.loc[d, "expected_images"], 8) for d in dataset_ids()}
    expected = {d: int(table.loc[d, "expected_images"]) for d in dataset_ids()}
    images = gather(parts, work / "images.parquet", work / "shards.tsv", expected, n_shards)
    rejected = qc_gather(rejection_parts, work / "rejected.tsv")
    return {"images": images, "rejected": rejected, "work": work, "n_shards": n_shards}


def test_every_true_image_indexed_once(indexed, demo_truth):
    images = indexed["images"]
    indexed_paths = {p.split("/raw/local/", 1)[1] for p in images.path}
    assert indexed_paths == set(demo_truth["images"])
    assert images.image_id.is_unique
    assert list(images.columns) == list(COLUMNS)


def test_modalities_and_dwi_companions(indexed, demo_truth):
    images = indexed["images"].set_index("image_id")
    assert set(images.modality) == {"T1w", "T2w", "FLAIR", "DWI"}
    dwi = images[images.modality == "DWI"]
    assert len(dwi) == sum(1 for v in demo_truth["images"].values() if v["modality"] == "DWI")
    for row in dwi.itertuples():
        assert Path(row.bval).is_file() and Path(row.bvec).is_file()
        assert row.n_volumes == len(np.loadtxt(row.bval, ndmin=1))
    assert (images[images.modality != "DWI"].n_volumes == 1).all()
    # a scan whose table sits only at the dataset root is indexed with that table (BIDS inheritance)
    inherited = [k for k, v in demo_truth["images"].items() if v.get("gradient_table", "").startswith("inherited")]
    assert inherited
    for rel in inherited:
        row = dwi[dwi.path.str.endswith(rel)].iloc[0]
        assert row.bval.endswith(f"{rel.split('/')[0]}/dwi.bval") and row.bvec.endswith(f"{rel.split('/')[0]}/dwi.bvec")


def test_geometry_matches_ground_truth(indexed, demo_truth):
    images = indexed["images"]
    for row in images.itertuples():
        truth = demo_truth["images"][row.path.split("/raw/local/", 1)[1]]
        if "spacing" in truth:
            assert [row.voxel_x, row.voxel_y, row.voxel_z] == pytest.approx(truth["spacing"], abs=1e-3)
            assert row.shape == "x".join(str(s) for s in truth["shape"])


def test_harmonised_participants_match_truth(indexed, demo_truth):
    images = indexed["images"]
    for row in images.itertuples():
        truth = demo_truth["participants"][f"{row.dataset}/sub-{row.subject}"]
        age = truth.get("session_age", {}).get(row.session, truth["age"])
        if age is None:
            assert math.isnan(row.age), row.image_id
        else:
            assert row.age == pytest.approx(age, abs=1e-3), row.image_id
        assert (row.sex, row.handedness, row.health_status) == (
            truth["sex"], truth["handedness"], truth["health_status"]), row.image_id


def test_acquisition_metadata(indexed):
    images = indexed["images"].set_index("image_id")
    # ds990002 inherits a top-level sidecar whose TR is in ms; no Manufacturer anywhere
    ds2 = images[images.dataset == "ds990002"]
    assert np.allclose(ds2.repetition_time, 1.9)
    assert (ds2.manufacturer == "unknown").all() and (ds2.field_strength == 1.5).all()
    # ds990003 writes EchoTime in ms
    assert images.loc["ds990003__sub-01_T2w", "echo_time"] == pytest.approx(0.409)
    assert images.loc["ds990001__sub-01_ses-01_T1w", "manufacturer"] == "Siemens"
    assert (images.dataset_version == "1.0.0").all()
    assert images.dataset_doi.str.contains("openneuro").all()


def test_injected_faults_rejected_and_rest_kept(indexed, demo_truth):
    rejected = indexed["rejected"]
    for fault in demo_truth["expected_rejections"]:
        rows = rejected[rejected.image == fault["path"]]
        assert len(rows) == 1, fault
        assert fault["reason"].split()[0].lower() in rows.reason.iloc[0].lower()
    assert len(rejected) == len(demo_truth["expected_rejections"])
    # the image whose sidecar is broken is still indexed
    assert "ds990002__sub-04_FLAIR" in set(indexed["images"].image_id)


def test_shards_cover_index(indexed):
    shards = pd.read_csv(indexed["work"] / "shards.tsv", sep="\t")
    images = indexed["images"]
    assert shards.n_images.sum() == len(images)
    for d, k in indexed["n_shards"].items():
        assert sorted(shards[shards.dataset == d].shard) == list(range(k))
        assert images[images.dataset == d].shard.between(0, k - 1).all()


def test_defacing_and_skull_stripping_match_masks(demo_mirror, demo_truth):
    checked = set()
    for rel, truth in demo_truth["images"].items():
        if truth["modality"] == "DWI":
            continue
        data = np.asarray(nib.load(demo_mirror / rel).dataobj)
        anon = np.asarray(nib.load(demo_mirror / truth["masks"]["anon"]).dataobj) > 0
        anat = np.asarray(nib.load(demo_mirror / truth["masks"]["anat"]).dataobj) > 0
        assert anon.shape == data.shape and not (anon & anat).any()
        kind = truth["anonymisation"]
        if kind == "defaced":
            assert anon.mean() > 0.01 and (data[anon] == 0).all()
        elif kind == "skull_stripped":
            assert (data[~anat] == 0).all() and anon.any()
        checked.add(kind)
    assert {"defaced", "skull_stripped", "face_blurred"} <= checked


def test_builder_is_deterministic(tmp_path, demo_mirror, demo_truth):
    spec = [s for s in _specs() if s.id == "ds990002"][0]
    DemoBuilder(tmp_path, seed=0).write_dataset(spec)
    paths = sorted((tmp_path / "ds990002").rglob("*.nii.gz"))
    # every image of the spec (the planted near-duplicates come later, from build()), so an empty build
    # (or a moved folder) cannot pass unnoticed
    planted = {p["copy"] for p in demo_truth["planted_duplicates"]}
    in_mirror = [p for p in (demo_mirror / "ds990002").rglob("*.nii.gz")
                 if p.relative_to(demo_mirror).as_posix() not in planted]
    assert len(paths) == len(in_mirror) >= 7, paths
    for path in paths:
        again = np.asarray(nib.load(path).dataobj)
        first = np.asarray(nib.load(demo_mirror / "ds990002" / path.relative_to(tmp_path / "ds990002")).dataobj)
        assert np.array_equal(again, first), path
