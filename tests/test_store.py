"""The blosc2 store: layout, atomic writes, padded region reads, the per-image files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import blosc2
import numpy as np
import pytest

from openmind_bench.store import (
    StoreSettings,
    image_files,
    open_array,
    read_properties,
    read_region,
    write_array,
    write_image,
)


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    return rng.normal(size=(1, 37, 50, 29)).astype(np.float32)


def test_layout_is_clipped_to_the_array():
    s = StoreSettings(chunk_shape=(64, 64, 64), block_shape=(32, 32, 32))
    assert s.layout((1, 40, 100, 20)) == ((1, 40, 64, 20), (1, 32, 32, 20))
    assert s.layout((10, 12, 14)) == ((10, 12, 14), (10, 12, 14))


@pytest.mark.parametrize("kwargs, message", [
    ({"codec": "snappy"}, "unknown blosc2 codec 'snappy'"),
    ({"clevel": 12}, "clevel must be in 0..9, got 12"),
    ({"chunk_shape": (64, 64)}, "chunk_shape must be three positive integers"),
    ({"block_shape": (256, 32, 32)}, r"block_shape \(256, 32, 32\) exceeds chunk_shape"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StoreSettings(**kwargs)


def test_round_trip_is_exact_and_uses_the_layout(tmp_path, volume):
    path = tmp_path / "a" / "img.b2nd"
    settings = StoreSettings(chunk_shape=(16, 16, 16), block_shape=(8, 8, 8), clevel=5)
    write_array(path, volume, settings)
    arr = open_array(path)
    assert np.array_equal(arr[...], volume)
    assert arr.chunks == (1, 16, 16, 16) and arr.blocks == (1, 8, 8, 8)
    assert arr.schunk.cparams.codec == blosc2.Codec.LZ4HC and arr.schunk.cparams.clevel == 5
    assert [p.name for p in path.parent.iterdir()] == ["img.b2nd"]  # no temporary left behind


def test_failed_write_leaves_nothing(tmp_path, volume, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(blosc2, "asarray", broken)
    with pytest.raises(OSError, match="disk full"):
        write_array(tmp_path / "img.b2nd", volume, StoreSettings())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux)")
def test_arrays_are_read_memory_mapped_as_nnunet_reads_its_cases(tmp_path, volume):
    path = tmp_path / "mapped.b2nd"
    write_array(path, volume, StoreSettings(chunk_shape=(16, 16, 16), block_shape=(8, 8, 8)))
    arr = open_array(path)
    assert np.array_equal(read_region(arr, (0, 0, 0), (8, 8, 8)), volume[0, :8, :8, :8])
    assert str(path) in Path("/proc/self/maps").read_text()
    assert StoreSettings().chunk_shape == (128, 128, 128) and StoreSettings().block_shape == (32, 32, 32)


def test_open_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.b2nd"):
        open_array(tmp_path / "nothing.b2nd")


@pytest.mark.parametrize("lower,size", [
    ((3, 4, 5), (10, 12, 8)),      # inside
    ((-4, 40, 20), (10, 15, 12)),  # crosses three borders
    ((-50, 0, 0), (10, 10, 10)),   # entirely outside
    ((0, 0, 0), (37, 50, 29)),     # the whole array
])
def test_read_region_pads_outside_the_array(tmp_path, volume, lower, size):
    path = tmp_path / "img.b2nd"
    write_array(path, volume, StoreSettings(chunk_shape=(16, 16, 16), block_shape=(8, 8, 8)))
    got = read_region(open_array(path), lower, size, fill=-7)
    padded = np.pad(volume[0], 60, constant_values=-7)
    ref = padded[tuple(slice(lo + 60, lo + 60 + n) for lo, n in zip(lower, size))]
    assert got.shape == tuple(size)
    assert np.array_equal(got, ref)
    assert np.array_equal(read_region(volume[0], lower, size, fill=-7), ref)  # numpy arrays work alike


def test_image_files_follow_the_nnssl_layout(tmp_path):
    files = image_files(tmp_path, "ds000001", "01", "", "ds000001__sub-01_T1w")
    assert files.image == tmp_path / "ds000001/sub-01/ses-DEFAULT/ds000001__sub-01_T1w.b2nd"
    assert files.anon.name == "ds000001__sub-01_T1w__anon.b2nd"
    assert files.anat.name == "ds000001__sub-01_T1w__anat.b2nd"
    assert files.nnssl_properties.name == "ds000001__sub-01_T1w.pkl"
    assert image_files(tmp_path, "ds000001", "sub-02", "ses-3", "x").stem == tmp_path / "ds000001/sub-02/ses-3/x"


def test_write_image_and_read_properties(tmp_path, volume):
    files = image_files(tmp_path, "ds000001", "01", "01", "ds000001__sub-01_ses-01_T1w")
    anon = np.zeros(volume.shape, np.uint8)
    anat = np.ones(volume.shape, np.uint8)
    props = {"shape": list(volume.shape[1:]), "zscore": {"mean": np.float64(1.5), "std": 2.0}, "box": np.arange(3)}
    write_image(files, volume, anon, anat, props, {"spacing": [1.0, 1.0, 1.0], "means": [1.5]}, StoreSettings())
    assert files.complete()
    assert np.array_equal(open_array(files.anat)[...], anat)
    assert json.loads(files.properties.read_text())["box"] == [0, 1, 2]
    assert read_properties(files.image)["zscore"]["mean"] == 1.5  # .json preferred
    assert read_properties(files.nnssl_properties)["means"] == [1.5]
    with open(files.nnssl_properties, "rb") as fh:
        assert pickle.load(fh)["spacing"] == [1.0, 1.0, 1.0]
    files.properties.unlink()
    assert read_properties(files.stem)["means"] == [1.5]  # falls back to nnssl's .pkl


def test_write_image_refuses_inconsistent_arrays(tmp_path, volume):
    files = image_files(tmp_path, "ds000001", "01", "", "x")
    good = np.zeros(volume.shape, np.uint8)
    with pytest.raises(ValueError, match="anon shape"):
        write_image(files, volume, good[:, :5], good, {}, {}, StoreSettings())
    with pytest.raises(ValueError, match="uint8"):
        write_image(files, volume, good.astype(np.float32), good, {}, {}, StoreSettings())
    assert not files.image.exists()
