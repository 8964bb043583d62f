import json

from openmind_bench.bids_names import datatype_of, parse_name
from openmind_bench.bids.sidecars import SidecarIndex


def test_parse_name():
    name = parse_name("sub-01/ses-02/anat/sub-01_ses-02_acq-mprage_run-1_T1w.nii.gz")
    assert name.entities == {"sub": "01", "ses": "02", "acq": "mprage", "run": "1"}
    assert (name.suffix, name.extension) == ("T1w", ".nii.gz")
    mp2 = parse_name("sub-01_inv-2_part-mag_MP2RAGE.nii")
    assert mp2.entities["inv"] == "2" and mp2.suffix == "MP2RAGE" and mp2.extension == ".nii"


def test_parse_name_rejects_non_bids():
    for bad in ("scan.nii.gz", "sub-01_T1w_final.nii.gz", "sub-01_sub-02_T1w.nii.gz", "T1w.nii.gz", "sub-01_-x_T1w.nii"):
        assert parse_name(bad) is None, bad


def test_datatype():
    assert datatype_of("sub-01/ses-1/dwi/sub-01_ses-1_dwi.nii.gz") == "dwi"


def test_sidecar_inheritance(tmp_path):
    files = {
        "T1w.json": {"Manufacturer": "Siemens", "RepetitionTime": 2.0, "EchoTime": 0.003},
        "sub-01/sub-01_T1w.json": {"RepetitionTime": 2.4},
        "sub-01/anat/sub-01_acq-fast_T1w.json": {"EchoTime": 0.002},
        "sub-01/anat/sub-01_T2w.json": {"EchoTime": 0.1},  # another suffix: must not apply
        "sub-02/anat/sub-02_T1w.json": {"EchoTime": 0.009},  # another subject: must not apply
    }
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(content))
    index = SidecarIndex(tmp_path, list(files))
    target = "sub-01/anat/sub-01_acq-fast_T1w.nii.gz"
    meta, problems = index.metadata(target, parse_name(target))
    assert meta == {"Manufacturer": "Siemens", "RepetitionTime": 2.4, "EchoTime": 0.002}
    assert problems == []


def test_malformed_sidecar_reported(tmp_path):
    (tmp_path / "sub-01/anat").mkdir(parents=True)
    (tmp_path / "sub-01/anat/sub-01_T1w.json").write_text("{oops")
    index = SidecarIndex(tmp_path, ["sub-01/anat/sub-01_T1w.json"])
    meta, problems = index.metadata("sub-01/anat/sub-01_T1w.nii.gz", parse_name("sub-01_T1w.nii.gz"))
    assert meta == {} and problems[0][0] == "sub-01/anat/sub-01_T1w.json"


def test_dwi_companion_inherited(tmp_path):
    for rel in ("dwi.bval", "dwi.bvec", "sub-01/dwi/sub-01_dwi.bval"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("0 1000\n")
    index = SidecarIndex(tmp_path, ["dwi.bval", "dwi.bvec", "sub-01/dwi/sub-01_dwi.bval"])
    rel = "sub-01/dwi/sub-01_dwi.nii.gz"
    assert index.companion(rel, parse_name(rel), ".bval") == "sub-01/dwi/sub-01_dwi.bval"
    assert index.companion(rel, parse_name(rel), ".bvec") == "dwi.bvec"


def _tiny_dataset(root, participants: str):
    """A one-subject raw tree (two T1w, one with a lying header) and its fetch manifest."""
    import nibabel as nib
    import numpy as np

    from conftest import lying_nifti
    from openmind_bench.download_manifest import FileRecord, Manifest

    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.8.0"}))
    (root / "participants.tsv").write_text(participants)
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    data = np.random.default_rng(0).normal(size=(6, 6, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), anat / "sub-01_T1w.nii.gz")
    lying_nifti(anat / "sub-01_run-2_T1w.nii.gz")
    rels = ["dataset_description.json", "participants.tsv", "sub-01/anat/sub-01_T1w.nii.gz",
            "sub-01/anat/sub-01_run-2_T1w.nii.gz"]
    return Manifest(dataset="ds000077", source="local", snapshot="1.0.0",
                    files=[FileRecord(path=r, size=(root / r).stat().st_size) for r in rels])


def _index(root, manifest, verify_data):
    from openmind_bench.bids.index import index_dataset
    from openmind_bench.qc import Rejections

    rejections = Rejections("index")
    table = index_dataset("ds000077", root, manifest, 1, ["T1w"], rejections, verify_data=verify_data)
    return table, rejections.frame()


def test_participants_problems_and_lying_header_are_recorded(tmp_path):
    tsv = "participant_id\tage\nsub-01\t24\nsub-02\t30\nsub-01\t99\n"
    root = tmp_path / "ds000077"
    manifest = _tiny_dataset(root, tsv)
    for verify_data in (False, True):
        table, rejected = _index(root, manifest, verify_data)
        reasons = dict(zip(rejected.image, rejected.reason))
        # the duplicate: first row kept, the file, the subject and the line named
        assert list(table.age) == [24.0]
        assert reasons["ds000077/participants.tsv"] == ("participant sub-01 listed again on line 4 (first on "
                                                        "line 2): the first row is kept, line 4 ignored")
        # a header claiming 1024^3 over a few bytes: said so, no MemoryError, nothing allocated
        why = reasons["ds000077/sub-01/anat/sub-01_run-2_T1w.nii.gz"]
        assert why.startswith("header claims 1024x1024x1024 voxels of int16 (2 GiB) but the file holds only"), why
        assert "MemoryError" not in why


def test_empty_participants_file_is_recorded(tmp_path):
    root = tmp_path / "ds000077"
    manifest = _tiny_dataset(root, "")
    table, rejected = _index(root, manifest, False)
    assert len(table) == 1 and table.age.isna().all()
    assert list(rejected.image) == ["ds000077/participants.tsv", "ds000077/sub-01/anat/sub-01_run-2_T1w.nii.gz"]
    assert "participants.tsv is empty" in rejected.reason.iloc[0]
