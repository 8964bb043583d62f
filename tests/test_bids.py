import json

from openmind_bench.bids.entities import datatype_of, parse_name
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
