"""The image-file integrity check (`openmind_bench.nifti.check_image_file`): a whole file passes; a
truncated gzip, a bad CRC or length trailer, NIfTI data shorter than the header says, and an
unreadable non-NIfTI image each raise an error naming the file and the problem."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from openmind_bench.nifti import ImageFileError, check_image_file, image_file_problem

from conftest import lying_nifti


def nifti(path, shape=(10, 12, 9), seed=0):
    data = np.random.default_rng(seed).normal(100, 20, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return path


def test_whole_files_pass(tmp_path):
    for name in ("a.nii.gz", "a.nii"):
        assert image_file_problem(nifti(tmp_path / name)) is None
    # two gzip members with zero padding between them: what gzip.GzipFile (and nibabel) read as one stream
    raw = gzip.decompress((tmp_path / "a.nii.gz").read_bytes())
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(raw[:500]) + b"\0" * 8 + gzip.compress(raw[500:]))
    check_image_file(tmp_path / "multi.nii.gz")
    # NIfTI-2
    img = nib.Nifti2Image(np.ones((4, 5, 6), np.float32), np.eye(4))
    nib.save(img, str(tmp_path / "two.nii.gz"))
    check_image_file(tmp_path / "two.nii.gz")


def test_half_truncated_gzip_is_named_with_its_length(tmp_path):
    path = nifti(tmp_path / "img.nii.gz", shape=(40, 40, 40))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageFileError, match=r"img\.nii\.gz: truncated: gzip stream ends after \d+ bytes"):
        check_image_file(path)


def test_crc_and_length_trailers_are_checked(tmp_path):
    path = nifti(tmp_path / "img.nii.gz")
    whole = bytearray(path.read_bytes())
    crc = bytearray(whole)
    crc[-8] ^= 0xFF  # the CRC-32: nibabel reads such a file without complaint
    path.write_bytes(bytes(crc))
    np.asarray(nib.load(str(path)).dataobj)
    with pytest.raises(ImageFileError, match=r"img\.nii\.gz: corrupt gzip .*CRC-32 check failed"):
        check_image_file(path)
    length = bytearray(whole)
    length[-1] ^= 0x01  # ISIZE
    path.write_bytes(bytes(length))
    assert "length trailer does not match" in image_file_problem(path)


def test_data_shorter_than_the_header_says(tmp_path):
    path = nifti(tmp_path / "img.nii.gz")
    raw = gzip.decompress(path.read_bytes())
    header_needs = 352 + 10 * 12 * 9 * 2
    assert len(raw) == header_needs
    # a whole, valid gzip stream of a NIfTI cut short before it was compressed
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ImageFileError,
                       match=rf"img\.nii\.gz: truncated: data has {header_needs - 100} bytes, header needs {header_needs}"):
        check_image_file(path)
    plain = tmp_path / "img.nii"
    plain.write_bytes(raw[:-1])
    assert image_file_problem(plain) == f"{plain}: truncated: data has {header_needs - 1} bytes, header needs {header_needs}"
    lying = lying_nifti(tmp_path / "lying.nii.gz")
    assert "header needs 2147484000" in image_file_problem(lying)


def test_not_an_image_and_other_formats(tmp_path):
    (tmp_path / "x.nii.gz").write_bytes(b"not a nifti at all")
    assert "not a gzip stream" in image_file_problem(tmp_path / "x.nii.gz")
    (tmp_path / "y.nii.gz").write_bytes(gzip.compress(b"\0" * 600))
    assert "not a NIfTI-1/2 file" in image_file_problem(tmp_path / "y.nii.gz")
    assert "cannot be read" in image_file_problem(tmp_path / "missing.nii.gz")
    import SimpleITK as sitk

    mha = tmp_path / "img.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 20, 20), np.int16)), str(mha))
    check_image_file(mha)
    mha.write_bytes(mha.read_bytes()[:-3000])
    assert image_file_problem(mha).startswith(f"{mha}: unreadable image (")


def test_bounded_memory_on_a_highly_compressible_stream(tmp_path):
    """An all-zero volume inflates ~1000:1; the check streams it in bounded pieces."""
    import tracemalloc

    path = tmp_path / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((256, 256, 256), np.int16), np.eye(4)), str(path))  # 32 MiB of voxels
    tracemalloc.start()
    check_image_file(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20


def test_upstream_readers_reject_a_file_nibabel_reads_despite_its_bad_crc(tmp_path):
    """nibabel stops reading at the last voxel, so a bad CRC-32 passes it; index verification,
    preprocessing and the DWI stage (whose derived maps would be whole files) run the check."""
    from openmind_bench.bids.index import read_header
    from openmind_bench.dwi.derive import load_series
    from openmind_bench.dwi.gradients import DwiRejected
    from openmind_bench.preprocess.image import ImageRejected, load_image

    def corrupt_crc(path):
        raw = bytearray(path.read_bytes())
        raw[-8] ^= 0xFF
        path.write_bytes(bytes(raw))
        return path

    anat = corrupt_crc(nifti(tmp_path / "T1w.nii.gz", shape=(12, 12, 12)))
    assert read_header(anat, verify_data=False)[1] is None  # headers only: nothing to see
    assert "corrupt gzip (CRC-32 check failed)" in read_header(anat, verify_data=True)[1]
    with pytest.raises(ImageRejected, match=r"image .*T1w\.nii\.gz: corrupt gzip \(CRC-32 check failed\)"):
        load_image(anat)
    dwi = corrupt_crc(nifti(tmp_path / "dwi.nii.gz", shape=(8, 8, 6, 7)))
    with pytest.raises(DwiRejected, match=r"load: .*dwi\.nii\.gz: corrupt gzip \(CRC-32 check failed\)"):
        load_series(dwi)
