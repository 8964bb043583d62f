"""Preprocessing: geometry round trip, resampling against scipy and SimpleITK, masks, rejections."""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

from conftest import lying_nifti
from openmind_bench.bids.index import conform
from openmind_bench.preprocess import ImageRejected, PreprocessSettings, preprocess_image, to_original_grid
from openmind_bench.preprocess.resample import lowres_axis, new_shape_for, zoom_to_shape
from openmind_bench.preprocess.shard import (NotRemade, listed_files, missing_outputs, remake_image,
                                             run_preprocess_shard)
from openmind_bench.store import open_array, read_properties


def rotation(deg_x: float, deg_y: float, deg_z: float) -> np.ndarray:
    x, y, z = np.radians([deg_x, deg_y, deg_z])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx


def grid_affine(axes: np.ndarray, spacing, centre_world, shape) -> np.ndarray:
    """Affine whose voxel axes are the columns of `axes` (unit vectors) scaled by `spacing`,
    with the grid centred on `centre_world`."""
    affine = np.eye(4)
    affine[:3, :3] = axes * np.asarray(spacing, float)
    affine[:3, 3] = np.asarray(centre_world) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def sample_world(volume: np.ndarray, volume_affine: np.ndarray, affine: np.ndarray, shape, order=1) -> np.ndarray:
    """`volume` (on `volume_affine`) sampled on the grid (`affine`, `shape`)."""
    idx = np.indices(shape).reshape(3, -1).astype(float)
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    src = np.linalg.inv(volume_affine)
    vox = src[:3, :3] @ world + src[:3, 3:4]
    return ndimage.map_coordinates(volume, vox, order=order, mode="constant").reshape(shape).astype(np.float32)


def phantom(world_shape=(80, 96, 72)):
    """A head-like phantom on a 1 mm RAS grid: textured ellipsoid (anatomy), a zeroed 'face'
    block inside it (anonymised), zero background."""
    ii, jj, kk = np.indices(world_shape).astype(float)
    c = (np.asarray(world_shape) - 1) / 2
    r = ((ii - c[0]) / 32) ** 2 + ((jj - c[1]) / 40) ** 2 + ((kk - c[2]) / 28) ** 2
    anat = r <= 1.0
    texture = 100 + 30 * np.sin(ii / 5.0) * np.cos(jj / 7.0) + 20 * np.sin(kk / 4.0) + 40 * (r < 0.5)
    anon = anat & (jj > c[1] + 22) & (kk < c[2] - 4)
    image = np.where(anat & ~anon, texture, 0.0).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 3] = -c
    return image, anat.astype(np.float32), anon.astype(np.float32), affine


def save(path, data, affine, dtype=np.float32):
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def dice(a, b) -> float:
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def oblique_case(tmp_path_factory):
    """The phantom acquired on an oblique, anisotropic (1.2, 3.0, 0.9) mm grid stored 'PSL'-like
    (axes permuted and flipped), with its anatomy and anonymisation masks on the same grid."""
    root = tmp_path_factory.mktemp("oblique")
    image, anat, anon, ph_affine = phantom()
    # voxel axes: -y, +z, -x (a P-S-L axis order), rotated by a few degrees
    axes = rotation(4, -3, 6) @ np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], float)
    spacing, shape = (1.2, 3.0, 0.9), (84, 28, 96)
    affine = grid_affine(axes, spacing, [0.0, 0.0, 0.0], shape)
    paths = {
        "image": save(root / "img.nii.gz", sample_world(image, ph_affine, affine, shape, order=1), affine),
        "anat": save(root / "anat.nii.gz", sample_world(anat, ph_affine, affine, shape, order=0), affine, np.uint8),
        "anon": save(root / "anon.nii.gz", sample_world(anon, ph_affine, affine, shape, order=0), affine, np.uint8),
    }
    settings = PreprocessSettings(spacing=(1.0, 1.0, 1.0))
    out = preprocess_image(paths["image"], settings, anat_mask=paths["anat"], anon_mask=paths["anon"], image_id="x")
    return paths, out


# ----------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("new_shape,orders", [
    ((53, 40, 70), (3, 3, 3)),  # up and down at once
    ((20, 61, 33), (1, 1, 1)),
    ((31, 17, 90), (0, 0, 0)),
    ((50, 50, 25), (3, 3, 0)),  # cubic in-plane, nearest along a thick axis
])
def test_separable_zoom_equals_scipy_zoom(new_shape, orders):
    vol = np.random.default_rng(1).normal(size=(40, 33, 45)).astype(np.float32)
    vol = ndimage.gaussian_filter(vol, 1.0)
    ours = zoom_to_shape(vol, new_shape, orders)
    ref = vol
    for axis, (n, order) in enumerate(zip(new_shape, orders)):  # scipy, one axis at a time
        factors = [n / ref.shape[axis] if a == axis else 1 for a in range(3)]
        ref = ndimage.zoom(ref, factors, order=order, mode="nearest", grid_mode=True)
    assert ours.shape == tuple(new_shape)
    np.testing.assert_allclose(ours, ref, atol=1e-5 * np.abs(vol).max())
    if len(set(orders)) == 1:  # and scipy's 3D zoom in one go
        full = ndimage.zoom(vol, [n / s for n, s in zip(new_shape, vol.shape)], order=orders[0], mode="nearest",
                            grid_mode=True)
        np.testing.assert_allclose(ours, full, atol=1e-5 * np.abs(vol).max())


def test_new_shape_and_lowres_axis_follow_nnssl():
    assert new_shape_for((100, 80, 30), (0.5, 1.0, 3.3), (1, 1, 1)) == (50, 80, 99)
    assert lowres_axis((0.5, 0.5, 3.0), 3.0) == 2
    assert lowres_axis((1.0, 1.0, 2.9), 3.0) is None
    assert lowres_axis((3.0, 0.5, 3.0), 3.0) is None  # two thick axes: no separate axis (nnU-Net)


def test_agrees_with_simpleitk_bspline_from_anisotropic_spacing(tmp_path):
    """The MNI template resampled onto a (0.5, 2, 3) mm LPS grid, preprocessed to 1 mm, matches
    SimpleITK's cubic B-spline resampling of the same file onto the grid our properties state."""
    template_path = resources.files("nilearn.datasets") / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    template = nib.load(str(template_path))
    spacing, shape = (0.5, 2.0, 3.0), (176, 52, 30)
    axes = rotation(0, 0, 3) @ np.diag([-1.0, -1.0, 1.0])  # LPS, slightly oblique
    affine = grid_affine(axes, spacing, [0.0, -18.0, 10.0], shape)
    known = sample_world(np.asarray(template.dataobj, np.float32), template.affine, affine, shape, order=1)
    path = save(tmp_path / "known.nii.gz", known, affine)

    # cubic along every axis here, so that one 3D B-spline is the reference
    settings = PreprocessSettings(spacing=(1.0, 1.0, 1.0), anisotropic_axis_order=3)
    out = preprocess_image(path, settings)
    props = out.properties
    assert props["original"]["orientation"] == "LPS" and props["orientation"] == "RAS"
    np.testing.assert_allclose(props["spacing"], 1.0, rtol=0.02)

    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    stored = np.asarray(props["affine"])
    direction = ras_to_lps @ stored[:3, :3]
    ref_grid = sitk.Image([int(s) for s in props["shape"]], sitk.sitkFloat32)
    ref_grid.SetSpacing([float(v) for v in np.linalg.norm(direction, axis=0)])
    ref_grid.SetDirection((direction / np.linalg.norm(direction, axis=0)).ravel().tolist())
    ref_grid.SetOrigin((ras_to_lps @ stored[:3, 3]).tolist())
    source = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    resampled = sitk.Resample(source, ref_grid, sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    reference = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)
    mean, std = props["zscore"]["mean"], props["zscore"]["std"]
    reference = np.clip((reference - mean) / std, (known.min() - mean) / std, (known.max() - mean) / std)

    ours = out.image[0]
    interior = np.zeros(ours.shape, bool)
    m = 8  # boundary conditions of the spline prefilter differ (scipy 'nearest', ITK mirror)
    interior[m:-m, m:-m, m:-m] = True
    diff = np.abs(ours - reference)[interior]
    assert np.corrcoef(ours[interior], reference[interior])[0, 1] > 0.9995
    assert np.percentile(diff, 99) < 0.01 and diff.max() < 0.06

    # nnssl's default treats the 3 mm axis (z in RAS) separately, nearest-neighbour along it
    default = preprocess_image(path, PreprocessSettings(spacing=(1.0, 1.0, 1.0)))
    assert default.properties["resampling"]["lowres_axis"] == 2
    assert default.image.shape == out.image.shape
    assert np.corrcoef(default.image[0][interior], reference[interior])[0, 1] > 0.98


# ----------------------------------------------------------------------------- geometry


def test_round_trip_to_the_original_grid(oblique_case):
    paths, out = oblique_case
    props = out.properties
    src = nib.load(str(paths["image"]))
    original = np.asarray(src.get_fdata(), np.float32)
    assert props["original"]["shape"] == list(original.shape)
    np.testing.assert_allclose(props["original"]["affine"], src.affine, atol=1e-4)
    assert props["reoriented"]["orientation"] == "RAS" == props["orientation"]
    np.testing.assert_allclose(props["spacing"], 1.0, rtol=0.03)

    # the crop box holds every non-zero voxel and nothing is lost outside it
    box = props["crop_box"]
    reoriented = nib.orientations.apply_orientation(original, np.asarray(props["reoriented"]["ornt"]))
    inside = np.zeros(reoriented.shape, bool)
    inside[tuple(slice(lo, hi) for lo, hi in box)] = True
    assert not reoriented[~inside].any() and reoriented[inside].any()

    back = to_original_grid(out.image, props, undo_zscore=True)
    assert back.shape == original.shape
    body = original > 0
    assert np.corrcoef(back[body], original[body])[0, 1] > 0.99
    assert np.abs(back[~body]).mean() < 0.05 * original[body].mean()

    # world geometry: the phantom's centre of mass is where the stored affine says it is
    def centre_of_mass(data, affine):
        com = np.array(ndimage.center_of_mass(np.clip(data, 0, None)))
        return affine[:3, :3] @ com + affine[:3, 3]

    stored_raw = out.image[0] * props["zscore"]["std"] + props["zscore"]["mean"]
    np.testing.assert_allclose(centre_of_mass(stored_raw, np.asarray(props["affine"])),
                               centre_of_mass(original, src.affine), atol=0.5)


def test_masks_are_binary_aligned_and_not_swapped(oblique_case):
    """nnssl writes the anonymisation mask into __anat when both exist; ours stay straight."""
    paths, out = oblique_case
    for mask in (out.anon, out.anat):
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert mask.shape == out.image.shape
    src_anon = nib.load(str(paths["anon"])).get_fdata()
    src_anat = nib.load(str(paths["anat"])).get_fdata()
    back_anon = to_original_grid(out.anon, out.properties, order=1) >= 0.5
    back_anat = to_original_grid(out.anat, out.properties, order=1) >= 0.5
    assert dice(back_anon, src_anon) > 0.85 and dice(back_anat, src_anat) > 0.95
    assert dice(back_anon, src_anat) < 0.3 and dice(back_anat, src_anon) < 0.3
    assert 0 < out.properties["anonymized_fraction"] < 0.1 < out.properties["anatomy_fraction"]
    # the anonymised voxels are the zeroed ones: background after z-scoring
    background = -out.properties["zscore"]["mean"] / out.properties["zscore"]["std"]
    core = ndimage.binary_erosion(out.anon[0], iterations=2)
    assert core.any() and np.abs(np.median(out.image[0][core]) - background) < 0.05
    assert out.properties["anatomy_mask_source"].endswith("anat.nii.gz")


def test_without_masks_anatomy_is_all_ones_and_nothing_anonymised(oblique_case):
    paths, _ = oblique_case
    out = preprocess_image(paths["image"], PreprocessSettings(spacing=(2.0, 2.0, 2.0)))
    assert out.anat.all() and not out.anon.any()
    assert out.properties["anatomy_mask_source"].startswith("default")
    assert out.properties["anatomy_bbox"] == [[0, s] for s in out.properties["shape"]]


# ----------------------------------------------------------------------------- the shard job


def _write_gz_truncated(path, good_path):
    raw = good_path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])


@pytest.fixture(scope="module")
def shard_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    rng = np.random.default_rng(3)
    image, anat, _, affine = phantom((40, 48, 36))
    eye = np.diag([2.0, 2.0, 2.0, 1.0])
    files = {
        "good": save(root / "good.nii.gz", image, eye),
        "masked": save(root / "masked.nii.gz", image, eye),
        "nan": save(root / "nan.nii.gz", np.where(image > 0, np.nan, 0), eye),
        "zero": save(root / "zero.nii.gz", np.zeros_like(image), eye),
        "constant": save(root / "constant.nii.gz", np.full_like(image, 5.0), eye),
        "thin": save(root / "thin.nii.gz", rng.normal(size=(20, 20, 1)), eye),
        "badmask": save(root / "badmask.nii.gz", image, eye),
        "dwi": save(root / "dwi.nii.gz", rng.normal(size=(10, 10, 10, 4)), eye),
        "other_shard": save(root / "other.nii.gz", image, eye),
    }
    _write_gz_truncated(root / "truncated.nii.gz", files["good"])
    files["truncated"] = root / "truncated.nii.gz"
    files["huge"] = lying_nifti(root / "huge.nii.gz")
    anat_ok = save(root / "anat_ok.nii.gz", anat, eye, np.uint8)
    anat_bad = save(root / "anat_bad.nii.gz", anat[:-2], eye, np.uint8)
    rows = []
    for name, path in files.items():
        rows.append({
            "image_id": f"ds000001__sub-{name}_T1w", "dataset": "ds000001",
            "shard": 1 if name == "other_shard" else 0, "subject": name, "session": "",
            "modality": "DWI" if name == "dwi" else "T1w", "path": str(path),
            "n_volumes": 4 if name == "dwi" else 1,
            "anat_mask": str(anat_ok) if name == "masked" else str(anat_bad) if name == "badmask" else "",
        })
    index = root / "images.parquet"
    conform(rows).to_parquet(index, index=False)
    out = root / "preprocessed"
    manifest = run_preprocess_shard([index], "ds000001", 0, out, root / "manifest.tsv", root / "rejected.tsv",
                                    PreprocessSettings(spacing=(2.5, 2.5, 2.5)))
    rejected = pd.read_csv(root / "rejected.tsv", sep="\t")
    return root, manifest, rejected


def test_bad_images_are_rejected_with_reasons_and_the_shard_finishes(shard_case):
    root, manifest, rejected = shard_case
    assert sorted(manifest.image_id) == ["ds000001__sub-good_T1w", "ds000001__sub-masked_T1w"]
    reasons = dict(zip(rejected.image, rejected.reason))
    expected = {
        "nan": "NaN", "zero": "empty", "constant": "constant", "thin": "degenerate",
        "truncated": "unreadable", "badmask": "anatomy mask",
        "huge": "header claims 1024x1024x1024 voxels of int16 (2 GiB) but the file holds only",
    }
    assert set(reasons) == {f"ds000001__sub-{k}_T1w" for k in expected}
    for key, word in expected.items():
        assert word in reasons[f"ds000001__sub-{key}_T1w"], reasons[f"ds000001__sub-{key}_T1w"]
    assert (rejected.stage == "preprocess").all() and (rejected.dataset == "ds000001").all()
    # the 4D DWI is skipped (not rejected), the other shard's image untouched
    assert not any("dwi" in i for i in list(rejected.image) + list(manifest.image_id))
    assert not (root / "preprocessed/ds000001/sub-other_shard").exists()


def test_shard_manifest_points_at_complete_images(shard_case):
    root, manifest, _ = shard_case
    for row in manifest.itertuples():
        image, anon, anat = (open_array(getattr(row, k)) for k in ("image", "anon", "anat"))
        assert image.shape == anon.shape == anat.shape and image.shape[0] == 1
        assert image.dtype == np.float32 and anat.dtype == np.uint8
        props = read_properties(row.properties)
        assert props["image_id"] == row.image_id and props["shape"] == list(image.shape[1:])
        assert "/ses-DEFAULT/" in row.image
    masked = manifest.set_index("image_id").loc["ds000001__sub-masked_T1w"]
    assert masked.anatomy_mask_source.endswith("anat_ok.nii.gz") and masked.anatomy_fraction < 1
    good = manifest.set_index("image_id").loc["ds000001__sub-good_T1w"]
    assert good.anatomy_fraction == 1.0 and good.anonymized_fraction == 0.0


def test_a_shard_where_every_image_fails_unexpectedly_fails(shard_case, monkeypatch):
    root, _, _ = shard_case
    import openmind_bench.preprocess.shard as shard

    def broken(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(shard, "preprocess_image", broken)
    with pytest.raises(RuntimeError, match="failed unexpectedly"):
        shard.run_preprocess_shard([root / "images.parquet"], "ds000001", 0, root / "pp2", root / "m2.tsv",
                                   root / "r2.tsv", PreprocessSettings())
    assert not (root / "m2.tsv").exists()


def test_rerun_removes_its_own_stale_temporaries_only(shard_case):
    """A kill -9 leaves `.NAME.tmp-PID` beside the outputs; the next run of the shard removes those
    of its own images and files, never another shard's."""
    root, _, _ = shard_case
    out = root / "preprocessed"
    good = out / "ds000001/sub-good/ses-DEFAULT"
    stale = [good / ".ds000001__sub-good_T1w.b2nd.tmp-4242", good / ".ds000001__sub-good_T1w__anat.b2nd.tmp-1",
             good / ".ds000001__sub-good_T1w.json.tmp-77", root / ".rerun_manifest.tsv.tmp-5"]
    # an image that was never written (rejected this time) can have a leftover too
    (out / "ds000001/sub-nan/ses-DEFAULT").mkdir(parents=True)
    stale.append(out / "ds000001/sub-nan/ses-DEFAULT/.ds000001__sub-nan_T1w__anon.b2nd.tmp-9")
    for path in stale:
        path.write_bytes(b"half")
    (stale[0].with_name(".ds000001__sub-good_T1w.pkl.tmp-3")).mkdir()  # directory-shaped leftover
    stale.append(stale[0].with_name(".ds000001__sub-good_T1w.pkl.tmp-3"))
    other = out / "ds000001/sub-other_shard/ses-DEFAULT/.ds000001__sub-other_shard_T1w.b2nd.tmp-4242"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"another shard's job is writing this")
    unrelated = good / ".notes.txt.tmp-1"
    unrelated.write_bytes(b"not an output of this shard")
    manifest = run_preprocess_shard([root / "images.parquet"], "ds000001", 0, out, root / "rerun_manifest.tsv",
                                    root / "rerun_rejected.tsv", PreprocessSettings(spacing=(2.5, 2.5, 2.5)))
    assert len(manifest) == 2
    assert [p for p in stale if p.exists()] == []
    assert other.exists() and unrelated.exists()
    leftovers = sorted(p.name for p in out.rglob(".*.tmp-*"))
    assert leftovers == sorted([other.name, unrelated.name]), leftovers


def test_a_deleted_store_file_is_listed_and_remade_byte_identical(shard_case):
    """What `snakemake all` does after a store file is deleted: the manifest names it missing, and
    rule preprocess_image's function re-makes that image's files exactly as its shard wrote them."""
    root, manifest, _ = shard_case
    args = ([root / "images.parquet"], root / "manifest.tsv", "ds000001")
    settings = PreprocessSettings(spacing=(2.5, 2.5, 2.5))
    row = manifest.set_index("image_id").loc["ds000001__sub-masked_T1w"]
    files = listed_files(manifest[manifest.image_id == "ds000001__sub-masked_T1w"])
    assert len(files) == 5 and files[-1].endswith(".pkl")
    before = {p: Path(p).read_bytes() for p in files}
    assert missing_outputs([root / "manifest.tsv"]) == []
    Path(row.image).unlink()
    Path(row.anat).unlink()
    assert missing_outputs([root / "manifest.tsv"]) == [row.image, row.anat]
    record = remake_image(*args, "ds000001__sub-masked_T1w", root / "preprocessed", settings)
    assert record["shape"] == row["shape"]
    assert {p: Path(p).read_bytes() for p in files} == before
    assert missing_outputs([root / "manifest.tsv"]) == []


def test_an_image_its_shard_did_not_write_or_would_write_differently_is_not_remade(shard_case):
    """The error names the shard command that re-makes the shard; nothing is written."""
    root, manifest, _ = shard_case
    args = ([root / "images.parquet"], root / "manifest.tsv", "ds000001")
    rerun = rf"snakemake {root / 'manifest.tsv'} --forcerun preprocess_shard"
    before = sorted((root / "preprocessed").rglob("*"))  # (other tests of the module leave files there too)
    with pytest.raises(NotRemade, match=rf"sub-nan_T1w: .* does not list this image .*rejected.*{rerun}"):
        remake_image(*args, "ds000001__sub-nan_T1w", root / "preprocessed", PreprocessSettings(spacing=(2.5,) * 3))
    assert sorted((root / "preprocessed").rglob("*")) == before
    # other settings than the shard's (they changed since it ran): refused before anything is written
    good = Path(manifest.set_index("image_id").loc["ds000001__sub-good_T1w"].image)
    saved = good.read_bytes()
    good.unlink()
    with pytest.raises(NotRemade, match=rf"differs from what .* records: shape .*{rerun}"):
        remake_image(*args, "ds000001__sub-good_T1w", root / "preprocessed", PreprocessSettings(spacing=(3.0,) * 3))
    assert not good.exists()
    remake_image(*args, "ds000001__sub-good_T1w", root / "preprocessed", PreprocessSettings(spacing=(2.5,) * 3))
    assert good.read_bytes() == saved


def test_header_claiming_more_data_than_the_file_holds(tmp_path):
    with pytest.raises(ImageRejected, match=r"huge\.nii\.gz: header claims 1024x1024x1024 voxels of int16 "
                                            r"\(2 GiB\) but the file holds only \d+ compressed bytes"):
        preprocess_image(lying_nifti(tmp_path / "huge.nii.gz"), PreprocessSettings())
    with pytest.raises(ImageRejected, match=r"holds only \d+ bytes"):
        preprocess_image(lying_nifti(tmp_path / "huge.nii", compress=False), PreprocessSettings())


def test_image_rejected_names_file_and_problem(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti"))
    with pytest.raises(ImageRejected, match=r"bad\.nii\.gz.*unreadable"):
        preprocess_image(bad, PreprocessSettings())
    with pytest.raises(ImageRejected, match="does not exist"):
        preprocess_image(tmp_path / "missing.nii.gz", PreprocessSettings())


def test_oversized_output_is_rejected_not_attempted(oblique_case):
    paths, _ = oblique_case
    with pytest.raises(ImageRejected, match="max_voxels"):
        preprocess_image(paths["image"], PreprocessSettings(spacing=(0.1, 0.1, 0.1), max_voxels=10**7))


def test_demo_defaced_scan_with_its_ground_truth_masks(demo_mirror, demo_truth):
    """Real data: a defaced demo T1w with the anonymisation and anatomy masks its builder applied."""
    rel = "ds990001/sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz"
    truth = demo_truth["images"][rel]
    assert truth["anonymisation"] == "defaced"
    anon_path, anat_path = (demo_mirror / truth["masks"][k] for k in ("anon", "anat"))
    out = preprocess_image(demo_mirror / rel, PreprocessSettings(spacing=(1.5, 1.5, 1.5)),
                           anat_mask=anat_path, anon_mask=anon_path)
    src_anon, src_anat = nib.load(str(anon_path)).get_fdata() > 0, nib.load(str(anat_path)).get_fdata() > 0
    back_anon = to_original_grid(out.anon, out.properties, order=1) >= 0.5
    back_anat = to_original_grid(out.anat, out.properties, order=1) >= 0.5
    assert dice(back_anon, src_anon) > 0.9 and dice(back_anat, src_anat) > 0.95
    assert dice(back_anon, src_anat) < 0.2  # straight, not nnssl's swap
    # the defaced voxels were zeroed by the builder: they are background in the stored image
    background = -out.properties["zscore"]["mean"] / out.properties["zscore"]["std"]
    core = ndimage.binary_erosion(out.anon[0], iterations=1)
    assert np.abs(np.median(out.image[0][core]) - background) < 0.05
