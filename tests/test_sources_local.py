import json
import os

import pytest

from openmind_bench.config import validate
from openmind_bench.qc import Rejections
from openmind_bench.sources import fetch_dataset
from openmind_bench.download_manifest import Manifest
from openmind_bench.sources.base import SourceError, selected, unsafe_reason


@pytest.fixture
def source_options(repo, tmp_path):
    config = validate({"source": {"kind": "local", "root": str(tmp_path / "mirror")}}, repo / "config" / "schema.yaml")
    return config["source"]


def _dataset(root, doi_version="1.0.0"):
    ds = root / "ds000042"
    files = {
        "dataset_description.json": json.dumps({"Name": "x", "BIDSVersion": "1.8.0",
                                                "DatasetDOI": f"doi:10.18112/openneuro.ds000042.v{doi_version}"}),
        "participants.tsv": "participant_id\tage\nsub-01\t30\n",
        "sub-01/anat/sub-01_T1w.nii.gz": "image-bytes",
        "sub-01/anat/sub-01_T1w.json": "{}",
        "sub-01/func/sub-01_task-rest_bold.nii.gz": "bold",
        "sub-01/fmap/sub-01_phasediff.nii.gz": "fmap",
        "derivatives/fmriprep/sub-01/anat/sub-01_desc-preproc_T1w.nii.gz": "deriv",
        "sub-01/ses-1/dwi/sub-01_ses-1_dwi.bval": "0 1000",
    }
    for rel, text in files.items():
        (ds / rel).parent.mkdir(parents=True, exist_ok=True)
        (ds / rel).write_text(text)
    return ds


def test_selection_globs(source_options):
    inc, exc = source_options["include"], source_options["exclude"]
    assert selected("sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", inc, exc)
    assert selected("sub-01/dwi/sub-01_dwi.bvec", inc, exc)
    assert selected("T1w.json", inc, exc)
    assert not selected("sub-01/func/sub-01_task-rest_bold.nii.gz", inc, exc)
    assert not selected("derivatives/x/sub-01/anat/sub-01_T1w.nii.gz", inc, exc)
    assert not selected("sub-01/anat/sub-01_defacemask.nii.gz", inc, exc)


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs/file", "sub-01/../../x", "a\\..\\b", "./x", "dir/"])
def test_unsafe_paths(key):
    assert unsafe_reason(key)


def test_safe_path():
    assert unsafe_reason("sub-01/anat/sub-01_T1w.nii.gz") is None


def test_fetch_copies_selection_and_resumes(tmp_path, source_options):
    _dataset(tmp_path / "mirror")
    dest = tmp_path / "raw" / "ds000042"
    rej = Rejections("fetch")
    manifest = fetch_dataset(source_options, "ds000042", "1.0.0", dest, dest / "download_manifest.json", rej)
    paths = sorted(f.path for f in manifest.files)
    assert paths == ["dataset_description.json", "participants.tsv", "sub-01/anat/sub-01_T1w.json",
                     "sub-01/anat/sub-01_T1w.nii.gz", "sub-01/ses-1/dwi/sub-01_ses-1_dwi.bval"]
    assert manifest.snapshot_match is True and manifest.dataset_doi.endswith("v1.0.0")
    assert all(f.md5 and f.size for f in manifest.files)
    assert not (dest / "sub-01/func").exists() and not (dest / "derivatives").exists()
    on_disk = Manifest.read(dest / "download_manifest.json")
    assert [f.path for f in on_disk.files] == [f.path for f in manifest.files]

    # resume: complete files are not rewritten, a changed source file is
    t1 = dest / "sub-01/anat/sub-01_T1w.nii.gz"
    os.utime(t1, (1, 1))
    (tmp_path / "mirror/ds000042/participants.tsv").write_text("participant_id\tage\nsub-01\t31\n")
    leftover = dest / "sub-01/anat/.sub-01_T1w.nii.gz.tmp-4242"  # a copy killed with -9
    leftover.write_text("half")
    fetch_dataset(source_options, "ds000042", "1.0.0", dest, dest / "download_manifest.json", rej)
    assert not leftover.exists()
    assert t1.stat().st_mtime == 1
    assert "31" in (dest / "participants.tsv").read_text()
    assert not list(dest.rglob(".*.tmp-*"))


def test_symlink_out_of_dataset_refused(tmp_path, source_options):
    ds = _dataset(tmp_path / "mirror")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy")
    (ds / "sub-01/anat/sub-01_T2w.nii.gz").symlink_to(secret)
    rej = Rejections("fetch")
    dest = tmp_path / "raw" / "ds000042"
    manifest = fetch_dataset(source_options, "ds000042", "1.0.0", dest, dest / "m.json", rej)
    assert manifest.refused[0]["path"] == "sub-01/anat/sub-01_T2w.nii.gz"
    assert not (dest / "sub-01/anat/sub-01_T2w.nii.gz").exists()
    assert rej.frame().reason.str.contains("symlink").any()


def test_snapshot_mismatch_warns_or_fails(tmp_path, source_options, caplog):
    _dataset(tmp_path / "mirror", doi_version="2.0.0")
    dest = tmp_path / "raw" / "ds000042"
    manifest = fetch_dataset(source_options, "ds000042", "1.0.0", dest, dest / "m.json", Rejections("fetch"))
    assert manifest.snapshot_match is False and manifest.snapshot_found == "2.0.0"
    assert "snapshot mismatch" in caplog.text
    with pytest.raises(SourceError, match="snapshot mismatch"):
        fetch_dataset({**source_options, "on_snapshot_mismatch": "fail"}, "ds000042", "1.0.0", dest,
                      dest / "m.json", Rejections("fetch"))


def test_missing_description_fails_clearly(tmp_path, source_options):
    ds = _dataset(tmp_path / "mirror")
    (ds / "dataset_description.json").unlink()
    dest = tmp_path / "raw" / "ds000042"
    with pytest.raises(SourceError, match="dataset_description.json"):
        fetch_dataset(source_options, "ds000042", "1.0.0", dest, dest / "m.json", Rejections("fetch"))
    assert not (dest / "m.json").exists()


def test_missing_dataset_fails_clearly(tmp_path, source_options):
    with pytest.raises(SourceError, match="ds000777"):
        fetch_dataset(source_options, "ds000777", "1.0.0", tmp_path / "d", tmp_path / "m.json", Rejections("fetch"))


def test_bookkeeping_files_listed_in_bidsignore(tmp_path, source_options):
    """download_manifest.json and the resume state stay out of the BIDS view; a shipped
    .bidsignore keeps its lines, and re-runs add nothing twice."""
    _dataset(tmp_path / "mirror")
    dest = tmp_path / "raw" / "ds000042"
    rej = Rejections("fetch")
    fetch_dataset(source_options, "ds000042", "1.0.0", dest, dest / "download_manifest.json", rej)
    lines = (dest / ".bidsignore").read_text().splitlines()
    assert "/download_manifest.json" in lines and "/.fetch_state.json" in lines
    assert ".bidsignore" not in [f.path for f in Manifest.read(dest / "download_manifest.json").files]

    # the dataset's own .bidsignore (as a fetch of it would place it) is extended, not replaced
    (dest / ".bidsignore").write_text("*_final.nii.gz")  # no trailing newline
    fetch_dataset(source_options, "ds000042", "1.0.0", dest, dest / "download_manifest.json", rej)
    fetch_dataset(source_options, "ds000042", "1.0.0", dest, dest / "download_manifest.json", rej)
    lines = (dest / ".bidsignore").read_text().splitlines()
    assert lines[0] == "*_final.nii.gz"
    assert lines.count("/download_manifest.json") == 1 and lines.count("/.fetch_state.json") == 1

    # a manifest kept outside the tree is not listed
    other = tmp_path / "raw2" / "ds000042"
    fetch_dataset(source_options, "ds000042", "1.0.0", other, tmp_path / "manifest.json", rej)
    assert (other / ".bidsignore").read_text().splitlines()[-1] == "/.fetch_state.json"
    assert "/download_manifest.json" not in (other / ".bidsignore").read_text()
