"""The DWI stage: gradient tables as OpenNeuro ships them, both backends on real dipy data, the
FSL bvec convention, messy scans, a whole shard into a BIDS derivatives tree, and the index's
inheritance of dataset-level tables. MRtrix3 runs with -nthreads 1 on tiny volumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.spatial.transform import Rotation

os.environ.setdefault("OMP_NUM_THREADS", "1")

from openmind_bench import config  # noqa: E402
from openmind_bench.bids.index import COLUMNS, conform, index_dataset  # noqa: E402
from openmind_bench.dwi.backends import DipyBackend, MrtrixBackend  # noqa: E402
from openmind_bench.dwi.derive import DwiSettings, derive_scan, load_series  # noqa: E402
from openmind_bench.dwi.gradients import (  # noqa: E402
    DwiRejected, Gradients, fsl_to_world, read_gradients, world_to_fsl)
from openmind_bench.dwi.shard import NotRemade, missing_outputs, remake_file, run_dwi_shard  # noqa: E402
from openmind_bench.qc import Rejections  # noqa: E402
from openmind_bench.sharding import image_id  # noqa: E402
from openmind_bench.sources import local  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
needs_mrtrix = pytest.mark.skipif(shutil.which("dwi2tensor") is None, reason="MRtrix3 (Debian mrtrix3) not installed")
VALIDATOR = shutil.which("bids-validator-deno", path=str(Path(sys.executable).parent)) or shutil.which("bids-validator-deno")


def settings(**overrides) -> DwiSettings:
    cfg = config.validate({"dwi": overrides}, REPO / "config" / "schema.yaml")["dwi"]
    return DwiSettings.from_config(cfg)


def write_table(folder: Path, stem: str, bvals, bvecs, columns: bool = False) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    bval, bvec = folder / f"{stem}.bval", folder / f"{stem}.bvec"
    np.savetxt(bval, np.asarray(bvals, float)[None, :], fmt="%g")
    np.savetxt(bvec, np.asarray(bvecs, float) if columns else np.asarray(bvecs, float).T, fmt="%.6f")
    return bval, bvec


def oblique_affine(flip: bool) -> np.ndarray:
    lin = Rotation.from_euler("xyz", [20, -15, 30], degrees=True).as_matrix() @ np.diag([2.0, 2.0, 2.5])
    if flip:
        lin = lin @ np.diag([-1.0, 1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lin
    return affine


def single_fibre(affine, n_dirs=20, shape=(6, 6, 6), fibre=(0.6, 0.7, 0.39), seed=0):
    """A uniform single-tensor phantom: FSL-convention bvecs, fibre direction given in world space."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n_dirs, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    bvals = np.r_[0.0, np.full(n_dirs, 1000.0)]
    bvecs = np.vstack([[0, 0, 0], g])
    e = np.asarray(fibre, float) / np.linalg.norm(fibre)
    tensor = 1.7e-3 * np.outer(e, e) + 0.3e-3 * (np.eye(3) - np.outer(e, e))
    gw = fsl_to_world(bvecs, affine)
    signal = 1000 * np.exp(-bvals * np.einsum("ni,ij,nj->n", gw, tensor, gw))
    data = np.broadcast_to(signal, shape + (len(bvals),)).astype(np.float32).copy()
    return data, Gradients(bvals, bvecs, 50.0, []), e


# ------------------------------------------------------------------ gradient tables


def test_gradients_rows_columns_normalisation_and_low_b(tmp_path):
    bvals = [0, 5, 1000, 1000, 1000]
    bvecs = [[0, 0, 0], [np.nan, np.nan, np.nan], [2, 0, 0], [0, 1, 0], [0, 0, 1]]
    rows = read_gradients(*write_table(tmp_path / "r", "dwi", bvals, bvecs), 5, b0_threshold=50)
    cols = read_gradients(*write_table(tmp_path / "c", "dwi", bvals, bvecs, columns=True), 5, b0_threshold=50)
    for grad in (rows, cols):
        assert grad.n_b0 == 2  # b=5 is a b0 at threshold 50; its NaN vector is cleared
        np.testing.assert_allclose(grad.bvecs[2], [1, 0, 0])  # normalised
        assert np.all(grad.bvecs[:2] == 0) and np.all(np.isfinite(grad.bvecs))
        assert any("b0" in n for n in grad.notes) and any("normalised" in n for n in grad.notes)
    assert any("N x 3" in n for n in cols.notes)
    # MRtrix's own threshold (10) would miss b=15 b0s; at threshold 10 a b=15 series has no b0
    strict = read_gradients(*write_table(tmp_path / "s", "dwi", [15, 1000], [[0, 0, 1], [1, 0, 0]]), 2, b0_threshold=10)
    assert strict.n_b0 == 0 and any("no b0" in n for n in strict.notes)


@pytest.mark.parametrize("bvals, bvecs, n, match", [
    ([0, 1000], [[0, 0, 0], [1, 0, 0]], 3, "2 b-values for 3 volumes"),
    ([0, 1000, 1000], [[0, 0, 0], [1, 0, 0]], 3, r"shape \(3, 2\) does not match 3 x 3"),
    ([0, 1000], [[0, 0, 0], [np.nan, 0, 0]], 2, "zero or non-finite direction"),
    ([0, -5], [[0, 0, 0], [1, 0, 0]], 2, "negative or non-finite"),
])
def test_gradients_rejected_with_file_and_reason(tmp_path, bvals, bvecs, n, match):
    bval, bvec = write_table(tmp_path, "dwi", bvals, bvecs)
    with pytest.raises(DwiRejected, match=match) as info:
        read_gradients(bval, bvec, n, b0_threshold=50)
    assert info.value.step == "gradients"


def test_gradients_missing(tmp_path):
    with pytest.raises(DwiRejected, match="no .bval/.bvec applies"):
        read_gradients(None, None, 3, 50)
    with pytest.raises(DwiRejected, match="cannot read the bval file"):
        read_gradients(tmp_path / "none.bval", tmp_path / "none.bvec", 3, 50)


@pytest.mark.parametrize("flip", [False, True])
def test_fsl_frame_round_trip(flip):
    affine = oblique_affine(flip)
    v = np.random.default_rng(1).normal(size=(10, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    np.testing.assert_allclose(world_to_fsl(fsl_to_world(v, affine), affine), v, atol=1e-9)


# ------------------------------------------------------------------ backends


@needs_mrtrix
@pytest.mark.parametrize("flip", [False, True])
def test_backends_agree_on_direction_fsl_convention(flip):
    """Oblique affine, with and without an x flip: both backends find the world-space fibre."""
    affine = oblique_affine(flip)
    data, grad, fibre = single_fibre(affine)
    mask = np.ones(data.shape[:3], bool)
    s = settings()
    dipy_v1 = DipyBackend(s).tensor(data, affine, grad, mask).v1[3, 3, 3]
    mrtrix = MrtrixBackend(s)
    try:
        mrtrix_v1 = mrtrix.tensor(data, affine, grad, mask).v1[3, 3, 3]
        # control: the same table read without the FSL x flip points MRtrix elsewhere
        wrong = Gradients(grad.bvals, grad.bvecs * [-1, 1, 1], grad.b0_threshold, [])
        wrong_v1 = mrtrix.tensor(data, affine, wrong, mask).v1[3, 3, 3]
    finally:
        mrtrix.close()
    assert abs(dipy_v1 @ fibre) > 0.999
    assert abs(mrtrix_v1 @ fibre) > 0.999
    assert abs(dipy_v1 @ mrtrix_v1) > 0.999
    assert abs(wrong_v1 @ fibre) < 0.99


@pytest.fixture(scope="module")
def small_64d():
    from dipy.data import get_fnames

    fimg, fbval, fbvec = get_fnames(name="small_64D")
    img = nib.load(str(fimg))
    grad = read_gradients(fbval, fbvec, img.shape[3], b0_threshold=50)  # its NaN b0 row is cleared here
    return np.asarray(img.dataobj, np.float32), img.affine, grad


@needs_mrtrix
def test_dipy_and_mrtrix_tensor_agree_on_real_data(small_64d):
    """dipy's FA/ADC vs MRtrix3's dwi2tensor | tensor2metric on the same real input and mask."""
    data, affine, grad = small_64d
    s = settings()
    dipy_backend = DipyBackend(s)
    mask = dipy_backend.mask(data, affine, grad, data[..., grad.b0_mask].mean(-1))
    assert 50 < mask.sum() < mask.size
    ours = dipy_backend.tensor(data, affine, grad, mask)
    mrtrix = MrtrixBackend(s)
    try:
        theirs = mrtrix.tensor(data, affine, grad, mask)
    finally:
        mrtrix.close()
    r_fa = np.corrcoef(ours.fa[mask], theirs.fa[mask])[0, 1]
    r_adc = np.corrcoef(ours.md[mask], theirs.md[mask])[0, 1]
    assert r_fa >= 0.95 and r_adc >= 0.95, (r_fa, r_adc)
    assert np.median(np.abs(ours.fa[mask] - theirs.fa[mask])) <= 0.03
    # ADC in mm^2/s, as MRtrix reports it (b in s/mm^2): 1e-4 .. 5e-3 in tissue and water
    assert 1e-4 < np.median(ours.md[mask]) < 5e-3
    np.testing.assert_allclose(np.median(ours.md[mask]), np.median(theirs.md[mask]), rtol=0.1)


def test_multishell_and_b15_b0_real_data():
    """small_101D: lowest b = 15 (a b0 at threshold 50), shells to b = 4065; tensor on b <= 1500."""
    from dipy.data import get_fnames

    fimg, fbval, fbvec = get_fnames(name="small_101D")
    quick = dict(denoise=False, degibbs=False, motion=False, bias=False, mask=False)
    result = derive_scan(fimg, fbval, fbvec, settings(**quick))
    assert result.t2w is not None and result.fa is not None
    assert any("tensor fitted on" in n and "b <= 1500" in n for n in result.notes)
    assert any("taken as b0" in n for n in result.notes)
    no_b0 = derive_scan(fimg, fbval, fbvec, settings(**quick, b0_threshold=10))
    assert no_b0.t2w is None and no_b0.fa is not None
    assert "no T2w: the series has no b0 volume" in no_b0.notes


# ------------------------------------------------------------------ messy scans


def save(path: Path, data, affine=np.eye(4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return path


def test_single_weighted_volume_gives_t2w_only(tmp_path):
    data, grad, _ = single_fibre(np.eye(4), n_dirs=1)
    path = save(tmp_path / "sub-01_dwi.nii.gz", data)
    bval, bvec = write_table(tmp_path, "sub-01_dwi", grad.bvals, grad.bvecs)
    result = derive_scan(path, bval, bvec, settings(degibbs=False, motion=False, mask=False))
    assert result.t2w is not None and result.fa is None and result.adc is None
    # a 6-voxel-thin volume would not fit a 7-voxel MP-PCA window: that step is skipped, not failed
    assert dict((s["step"], s["outcome"]) for s in result.status)["denoise"] == "done"
    thin = derive_scan(path, bval, bvec, settings(degibbs=False, motion=False, mask=False, denoise_patch_radius=3))
    assert dict((s["step"], s["outcome"]) for s in thin.status)["denoise"].startswith("skipped: image (6, 6, 6) thinner")
    assert any(n.startswith("no ADC/FA: 1 distinct direction") for n in result.notes)
    assert [s["outcome"] for s in result.status if s["step"] == "tensor"][0].startswith("skipped")


def test_3d_file_labelled_dwi_and_nans(tmp_path):
    flat = save(tmp_path / "flat_dwi.nii.gz", np.ones((5, 5, 5)))
    with pytest.raises(DwiRejected, match="a 3D image labelled dwi") as info:
        load_series(flat)
    assert info.value.step == "load"
    data = np.random.default_rng(0).uniform(1, 2, (5, 5, 5, 3)).astype(np.float32)
    data[0, 0, 0, :] = np.nan
    loaded, _, notes = load_series(save(tmp_path / "nan_dwi.nii.gz", data))
    assert np.isfinite(loaded).all() and notes == ["3 NaN/Inf voxel values set to 0"]


# ------------------------------------------------------------------ a shard, end to end


def index_row(dataset, rel, root: Path, shard=0, bval="", bvec="", n_volumes=2) -> dict:
    sub = rel.split("/")[0].removeprefix("sub-")
    return {"image_id": image_id(dataset, rel), "dataset": dataset, "shard": shard, "subject": sub, "session": "",
            "datatype": "dwi", "suffix": "dwi", "modality": "DWI", "entities": json.dumps({"sub": sub}),
            "path": (root / rel).as_posix(), "bval": bval, "bvec": bvec, "n_volumes": n_volumes}


def test_shard_writes_valid_bids_derivatives_and_rejects(tmp_path, small_64d):
    data, affine, grad = small_64d
    ds, raw = "ds000001", tmp_path / "raw" / "ds000001"
    save(raw / "sub-01/dwi/sub-01_dwi.nii.gz", data, affine)
    inherited = write_table(raw, "dwi", grad.bvals, grad.bvecs)  # the index resolved these by inheritance
    save(raw / "sub-02/dwi/sub-02_dwi.nii.gz", data[..., :10], affine)
    wrong = write_table(raw / "sub-02/dwi", "sub-02_dwi", grad.bvals[:9], grad.bvecs[:9])
    save(raw / "sub-03/dwi/sub-03_dwi.nii.gz", data[..., 0], affine)
    rows = [index_row(ds, "sub-01/dwi/sub-01_dwi.nii.gz", raw, bval=str(inherited[0]), bvec=str(inherited[1]), n_volumes=65),
            index_row(ds, "sub-02/dwi/sub-02_dwi.nii.gz", raw, bval=str(wrong[0]), bvec=str(wrong[1]), n_volumes=10),
            index_row(ds, "sub-03/dwi/sub-03_dwi.nii.gz", raw, bval=str(inherited[0]), bvec=str(inherited[1]), n_volumes=1),
            index_row(ds, "sub-04/dwi/sub-04_dwi.nii.gz", raw, shard=1)]  # another shard: not this job's
    index = tmp_path / "images.parquet"
    conform(rows).to_parquet(index)
    out = tmp_path / "results"
    table = run_dwi_shard(index, ds, 0, out / "derivatives/dwi", out / "table.parquet", out / "status.tsv",
                          out / "rejected.tsv", settings(motion=False))
    assert list(table.columns) == list(COLUMNS)
    assert sorted(table.modality) == ["ADC", "FA", "T2w"]
    assert set(table.derived_from) == {image_id(ds, "sub-01/dwi/sub-01_dwi.nii.gz")}
    assert table.image_id.tolist() == [image_id(ds, Path(p).name) for p in table.path]
    assert (table.shard == 0).all() and (table.n_volumes == 1).all()
    for path, mask in zip(table.path, table.anat_mask):
        img = nib.load(path)
        assert img.shape == data.shape[:3] and np.allclose(img.affine, affine, atol=1e-4)
        assert Path(mask).exists()
    rejected = pd.read_csv(out / "rejected.tsv", sep="\t")
    reasons = dict(zip(rejected.image, rejected.reason))
    assert reasons[image_id(ds, "sub-02/dwi/sub-02_dwi.nii.gz")].startswith("gradients:")
    assert "9 b-values for 10 volumes" in reasons[image_id(ds, "sub-02/dwi/sub-02_dwi.nii.gz")]
    assert reasons[image_id(ds, "sub-03/dwi/sub-03_dwi.nii.gz")].startswith("load: ")
    assert (rejected.stage == "dwi").all() and len(rejected) == 2
    status = pd.read_csv(out / "status.tsv", sep="\t")
    assert list(status.columns) == ["image_id", "dataset", "shard", "step", "seconds", "outcome"]
    steps = status[status.image_id == image_id(ds, "sub-01/dwi/sub-01_dwi.nii.gz")]
    assert steps.step.tolist() == ["load", "gradients", "denoise", "degibbs", "motion", "bias", "mask", "tensor"]
    assert steps.set_index("step").outcome["motion"] == "skipped: off in config"
    description = json.loads((out / "derivatives/dwi" / ds / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"]
    if VALIDATOR:
        proc = subprocess.run([VALIDATOR, str(out / "derivatives/dwi" / ds)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:]
    # a derived map and a brain mask deleted after the shard ran: listed missing, re-made on their own
    # (rule dwi_file), the NIfTI files byte-identical
    fa = table[table.modality == "FA"].path.iloc[0]
    brain = table.anat_mask.iloc[0]
    before = {p: Path(p).read_bytes() for p in (fa, brain)}
    assert missing_outputs([out / "table.parquet"]) == []
    for p in before:
        Path(p).unlink()
    Path(fa.replace(".nii.gz", ".json")).unlink()
    assert sorted(missing_outputs([out / "table.parquet"])) == sorted([fa, brain, fa.replace(".nii.gz", ".json")])
    for p in (fa, brain, fa.replace(".nii.gz", ".json")):
        remake_file(index, out / "table.parquet", ds, p, settings(motion=False))
    assert {p: Path(p).read_bytes() for p in before} == before
    assert json.loads(Path(fa.replace(".nii.gz", ".json")).read_text())["Sources"]
    # a rejected scan's map: no job makes it; the error names the shard command
    never = out / "derivatives/dwi" / ds / "sub-02/dwi/sub-02_desc-FA_dwimap.nii.gz"
    rerun = rf"snakemake {out / 'table.parquet'} --forcerun dwi_shard"
    with pytest.raises(NotRemade, match=rf"lists no derived scan .*{rerun}"):
        remake_file(index, out / "table.parquet", ds, never, settings(motion=False))
    assert not never.exists()


def test_index_inherits_dataset_level_gradient_table(tmp_path):
    """A scan whose dwi.bval/dwi.bvec sit at the dataset root is fetched with them and indexed."""
    src = tmp_path / "mirror" / "ds000002"
    data, grad, _ = single_fibre(np.eye(4), n_dirs=6)
    for sub in ("01", "02"):
        save(src / f"sub-{sub}/dwi/sub-{sub}_acq-b1000_dwi.nii.gz", data)
    write_table(src, "dwi", grad.bvals, grad.bvecs)
    write_table(src / "sub-02", "sub-02_acq-b1000_dwi", grad.bvals, grad.bvecs, columns=True)  # nearer, N x 3
    (src / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    options = config.validate({}, REPO / "config" / "schema.yaml")["source"]
    rejections = Rejections("fetch")
    manifest = local.fetch("ds000002", "1.0.0", tmp_path / "raw" / "ds000002",
                           dict(options, root=str(tmp_path / "mirror")), rejections)
    assert {"dwi.bval", "dwi.bvec"} <= {f.path for f in manifest.files}
    index_rejections = Rejections("index")
    table = index_dataset("ds000002", tmp_path / "raw" / "ds000002", manifest, 1, ["DWI"], index_rejections)
    assert len(index_rejections) == 0, index_rejections.rows
    by_subject = table.set_index("subject")
    assert by_subject.loc["01", "bval"].endswith("ds000002/dwi.bval")
    assert by_subject.loc["02", "bvec"].endswith("sub-02/sub-02_acq-b1000_dwi.bvec")


@needs_mrtrix
def test_mrtrix_backend_every_step_on_real_data():
    """dwidenoise, mrdegibbs, dwi2mask, dwi2tensor/tensor2metric through nipype on small_64D (NaN b0 row)."""
    from dipy.data import get_fnames

    fimg, fbval, fbvec = get_fnames(name="small_64D")
    result = derive_scan(fimg, fbval, fbvec, settings(backend="mrtrix3", motion=False))
    outcomes = {s["step"]: s["outcome"] for s in result.status}
    assert all(outcomes[s] == "done" for s in ("denoise", "degibbs", "bias", "mask", "tensor")), outcomes
    assert result.mask.any() and np.isfinite(result.fa).all() and np.isfinite(result.adc).all()
    assert 0.0 < np.median(result.fa[result.mask]) < 1.0
