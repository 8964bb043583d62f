"""The patch loader: determinism and streams, padding, anatomy-aware centres, augmentation
geometry, and reading data written by nnssl's own preprocessing."""

from __future__ import annotations

import itertools
import json
import math
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch

from openmind_bench.bids.index import conform
from openmind_bench.curation import PREPROCESSED_TWIN, run_selection
from openmind_bench.data import (
    Augmentation,
    AugmentationParams,
    PatchSampler,
    load_pretrain_images,
    make_pretrain_loader,
    read_nnssl_preprocessed,
)
from openmind_bench.preprocess import PreprocessSettings
from openmind_bench.preprocess.shard import run_preprocess_shard
from openmind_bench.store import StoreSettings, open_array, read_region, write_array

PATCH = (32, 32, 32)


def textured(shape, seed):
    """Smooth, asymmetric texture inside an ellipsoid, zero outside (so images get cropped)."""
    ii, jj, kk = np.indices(shape).astype(float)
    c = (np.asarray(shape) - 1) / 2
    r = sum(((g - m) / (0.45 * n)) ** 2 for g, m, n in zip((ii, jj, kk), c, shape))
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6, 3)
    tex = 50 + 20 * np.sin(ii / 3 + phase[0]) + 15 * np.cos(jj / 4 + phase[1]) + 10 * np.sin(kk / 5 + phase[2]) + ii
    return np.where(r <= 1, tex, 0).astype(np.float32), r


@pytest.fixture(scope="module")
def selection(tmp_path_factory):
    """Three images through the real preprocessing and selection: a head-sized one with a small
    anatomy mask, one thinner than the patch along x, one with both masks."""
    root = tmp_path_factory.mktemp("loader")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    specs = {"big": ((56, 60, 50), 0), "thin": ((12, 50, 44), 1), "masked": ((44, 44, 40), 2)}
    rows = []
    for name, (shape, seed) in specs.items():
        image, r = textured(shape, seed)
        path = root / f"sub-{name}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), str(path))
        row = {"image_id": f"ds000001__sub-{name}_T1w", "dataset": "ds000001", "shard": 0, "subject": name,
               "session": "", "modality": "T1w", "path": str(path), "n_volumes": 1}
        if name == "big":  # anatomy: a small ball, a few % of the image
            anat = (r <= 0.12).astype(np.uint8)
            nib.save(nib.Nifti1Image(anat, affine), str(root / "big_anat.nii.gz"))
            row["anat_mask"] = str(root / "big_anat.nii.gz")
        if name == "masked":
            nib.save(nib.Nifti1Image((r <= 1).astype(np.uint8), affine), str(root / "m_anat.nii.gz"))
            nib.save(nib.Nifti1Image(((r <= 1) & (np.indices(shape)[1] > 30)).astype(np.uint8), affine),
                     str(root / "m_anon.nii.gz"))
            row.update(anat_mask=str(root / "m_anat.nii.gz"), anon_mask=str(root / "m_anon.nii.gz"))
        rows.append(row)
    index = root / "images.parquet"
    conform(rows).to_parquet(index, index=False)
    settings = PreprocessSettings(spacing=(2.0, 2.0, 2.0), store=StoreSettings(chunk_shape=(16, 16, 16),
                                                                               block_shape=(8, 8, 8)))
    run_preprocess_shard([index], "ds000001", 0, root / "preprocessed", root / "m.tsv", root / "r.tsv", settings)
    out = root / "selections" / "all"
    run_selection({"name": "all"}, 1, [index], [root / "m.tsv"], out / "pretrain_data.json", out / PREPROCESSED_TWIN,
                  out / "images.tsv")
    return out / "pretrain_data.json"


@pytest.fixture(scope="module")
def images(selection):
    return load_pretrain_images(selection)


def index_of(images, name):
    return next(i for i, im in enumerate(images) if im.image_id == f"ds000001__sub-{name}_T1w")


def batches(loader):
    return [{k: (v.clone() if torch.is_tensor(v) else list(v)) for k, v in b.items()} for b in loader]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["image_id"] == y["image_id"]
        for k in ("image", "anon", "anat"):
            assert torch.equal(x[k], y[k]), k


def test_batches_have_the_promised_keys_shapes_and_types(selection):
    [batch] = list(make_pretrain_loader(selection, PATCH, 3, seed=0, steps=1))
    assert set(batch) == {"image", "anon", "anat", "image_id"}
    for key in ("image", "anon", "anat"):
        assert batch[key].shape == (3, 1, *PATCH) and batch[key].dtype == torch.float32
    for key in ("anon", "anat"):
        assert set(batch[key].unique().tolist()) <= {0.0, 1.0}
    assert len(batch["image_id"]) == 3 and all(i.startswith("ds000001__") for i in batch["image_id"])


def test_deterministic_under_seed_same_for_any_worker_count_distinct_per_rank(selection):
    def run(**kw):
        args = dict(seed=7, steps=5, anatomy_aware=True) | kw
        return batches(make_pretrain_loader(selection, PATCH, 2, **args))

    ref = run()
    assert_same(ref, run())
    assert_same(ref, run(num_workers=2))
    other_rank = run(rank=1, world_size=2)
    other_seed = run(seed=8)
    for other in (other_rank, other_seed):
        assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(ref, other))
    # consecutive batches of one stream differ too
    assert not torch.equal(ref[0]["image"], ref[1]["image"])
    with pytest.raises(ValueError, match="rank"):
        make_pretrain_loader(selection, PATCH, 2, seed=0, rank=2, world_size=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_epochs_continue_the_stream_and_runs_resume_exactly(selection, workers):
    loader = make_pretrain_loader(selection, PATCH, 2, seed=3, steps=3, num_workers=workers, augment=False)
    first, second = batches(loader), batches(loader)
    assert len(loader) == 3
    whole = batches(make_pretrain_loader(selection, PATCH, 2, seed=3, steps=6, augment=False))
    assert_same(first + second, whole)
    resumed = batches(make_pretrain_loader(selection, PATCH, 2, seed=3, steps=3, first_batch=3, augment=False))
    assert_same(resumed, second)


def test_raw_selection_json_reads_its_twin_and_raw_only_fails(selection, tmp_path):
    assert [i.image for i in load_pretrain_images(selection)] == \
        [i.image for i in load_pretrain_images(selection.with_name(PREPROCESSED_TWIN))]
    lonely = tmp_path / "pretrain_data.json"
    lonely.write_text(selection.read_text())
    with pytest.raises(ValueError, match="no preprocessed twin"):
        load_pretrain_images(lonely)


def test_a_deleted_store_file_fails_naming_the_target_that_remakes_it(selection, images):
    gone = images[0].image
    kept = gone.with_name(gone.name + ".kept")
    gone.rename(kept)
    try:
        with pytest.raises(FileNotFoundError, match=rf"1 of {len(images)} image file\(s\) do not exist.*"
                                                    rf"`snakemake {gone}`.*`snakemake all`"):
            load_pretrain_images(selection)
    finally:
        kept.rename(gone)

def test_patches_are_padded_with_zeros_at_the_borders(images):
    sampler = PatchSampler(images, PATCH)
    i = index_of(images, "thin")
    shape = sampler.shape(i)
    assert shape[0] < PATCH[0]
    patch = sampler.crop(i, (0, 0, 0))  # the patch spans [-16, 16) on every axis
    direct = read_region(open_array(images[i].image), (0, 0, 0), (16, 16, 16))
    assert torch.equal(patch["image"][0, 16:, 16:, 16:], torch.from_numpy(direct))
    assert not patch["image"][0, :16].any() and not patch["anat"][0, :16].any()
    inside = tuple(slice(16, 16 + min(16, s)) for s in shape)
    assert patch["anat"][0][inside].all()  # no anatomy mask given: all anatomy inside the image
    assert patch["anat"][0].sum() == math.prod(min(16, s) for s in shape)  # and none outside
    # an image thinner than the patch is centred along that axis (nnssl)
    rng = np.random.default_rng(0)
    for _ in range(5):
        centre = sampler.sample_centre(i, rng)
        assert centre[0] - PATCH[0] // 2 == (shape[0] - PATCH[0]) // 2


def test_anatomy_aware_centres_lie_in_the_anatomy(images):
    i = index_of(images, "big")
    anat = open_array(images[i].anat)[0]
    assert 0 < anat.mean() < 0.1
    aware, plain = PatchSampler(images, PATCH, anatomy_aware=True), PatchSampler(images, PATCH)
    rng = np.random.default_rng(1)
    centres = [aware.sample_centre(i, rng) for _ in range(40)]
    assert all(anat[tuple(c)] == 1 for c in centres)
    assert all(aware.crop(i, c)["anat"][0, 16, 16, 16] == 1 for c in centres[:5])
    plain_centres = [plain.sample_centre(i, rng) for _ in range(40)]
    assert sum(anat[tuple(c)] == 1 for c in plain_centres) < 20  # plain sampling often misses it


def test_identity_augmentation_is_the_plain_crop_and_flips_flip(images):
    sampler = PatchSampler(images, PATCH, augmentation=Augmentation())
    i = index_of(images, "masked")
    centre = np.array(sampler.shape(i)) // 2
    plain = sampler.crop(i, centre, augment=False)
    same = sampler.crop(i, centre, params=AugmentationParams((0.0, 0.0, 0.0), 1.0, ()))
    for k in ("image", "anon", "anat"):
        assert torch.allclose(same[k], plain[k], atol=1e-4), k
    flipped = sampler.crop(i, centre, params=AugmentationParams(None, None, (0, 2)))
    assert torch.equal(flipped["image"], torch.flip(plain["image"], [1, 3]))
    assert torch.equal(flipped["anon"], torch.flip(plain["anon"], [1, 3]))


def test_rotation_and_scaling_move_voxels_where_they_should(images):
    sampler = PatchSampler(images, PATCH)
    i = index_of(images, "masked")
    arr = open_array(images[i].image)[0]
    centre = np.array(arr.shape) // 2
    size = (21, 21, 21)  # odd: the centre voxel is an array voxel, half-integer shifts vanish
    # 90 degrees about z: a rot90 of the plain crop in the x-y plane (one of the two senses)
    rotated = sampler.crop(i, centre, size=size, params=AugmentationParams((0.0, 0.0, math.pi / 2), None, ()))
    plain = sampler.crop(i, centre, size=size, augment=False)
    candidates = [torch.rot90(plain["image"], k, dims=(1, 2)) for k in (1, 3)]
    err = min(float((rotated["image"] - c).abs().max()) for c in candidates)
    assert err < 1e-3 * float(plain["image"].abs().max())
    # scaling by 2 samples every second voxel of a box twice as large
    scaled = sampler.crop(i, centre, size=size, params=AugmentationParams(None, 2.0, ()))
    lo = centre - 20
    expected = read_region(arr, lo, (41, 41, 41))[::2, ::2, ::2]  # zero where the box leaves the image
    assert torch.allclose(scaled["image"][0], torch.from_numpy(np.ascontiguousarray(expected)), atol=1e-4)
    assert set(scaled["anon"].unique().tolist()) <= {0.0, 1.0}


def test_augmented_masks_stay_aligned_with_the_image(images):
    sampler = PatchSampler(images, PATCH, augmentation=Augmentation(p_rotation=1.0, p_scaling=1.0))
    i = index_of(images, "masked")
    props = json.loads(images[i].properties.read_text())
    background = -props["zscore"]["mean"] / props["zscore"]["std"]  # the image's zero, z-scored
    rng = np.random.default_rng(5)
    for _ in range(3):
        patch = sampler.crop(i, sampler.sample_centre(i, rng), rng)
        image, anat, anon = patch["image"][0], patch["anat"][0].bool(), patch["anon"][0].bool()
        tissue = (image - background) > 1.0
        empty = (image - background).abs() < 1e-3
        assert tissue.sum() > 1000 and empty.sum() > 100
        assert anat[tissue].float().mean() > 0.99 and anat[empty].float().mean() < 0.01
        assert (anon & ~anat).float().mean() < 0.005


# ----------------------------------------------------------------------------- nnssl interop


@pytest.fixture()
def nnssl_folder(tmp_path, monkeypatch):
    """A tiny folder as nnssl's preprocessing writes it: {data_identifier}/{collection}/{dataset}/
    {subject}/{session}/{name}.b2nd + __anon/__anat + .pkl, and pretrain_data__onemmiso.json with
    `$nnssl_preprocessed` paths. Image one has both masks (so nnssl stored them swapped)."""
    monkeypatch.setenv("nnssl_preprocessed", str(tmp_path / "nnssl_preprocessed"))
    data_dir = tmp_path / "nnssl_preprocessed" / "Dataset745_OpenMind" / "nnsslPlans_onemmiso"
    collection = {"collection_index": 745, "collection_name": "Dataset745_OpenMind", "datasets": {}}
    settings = StoreSettings(chunk_shape=(16, 16, 16), block_shape=(8, 8, 8))
    truth = {}
    layout = [("sub-01", ("anatomy_mask", "anonymization_mask")), ("sub-02", ("anatomy_mask",))]
    for n, (sub, masks) in enumerate(layout):
        shape = (30, 36, 34)
        image, r = textured(shape, 10 + n)
        anat = (r <= 1).astype(np.int8)
        anon = ((r <= 1) & (np.indices(shape)[2] < 8)).astype(np.int8)
        folder = data_dir / "Dataset745_OpenMind" / "ds000009" / sub / "ses-DEFAULT"
        stem = folder / f"{sub}_T1w"
        write_array(stem.with_name(stem.name + ".b2nd"), image[None], settings)
        stored_anat, stored_anon = (anon, anat) if len(masks) == 2 else (anat, None)  # nnssl's swap
        write_array(stem.with_name(stem.name + "__anat.b2nd"), np.where(r <= 1.2, stored_anat, -1)[None], settings)
        if stored_anon is not None:
            write_array(stem.with_name(stem.name + "__anon.b2nd"), stored_anon[None], settings)
        with open(stem.with_name(stem.name + ".pkl"), "wb") as fh:
            pickle.dump({"spacing": [1.0, 1.0, 1.0], "shape_before_cropping": shape,
                         "bbox_used_for_cropping": [[0, s] for s in shape]}, fh)
        pp = ("$nnssl_preprocessed/Dataset745_OpenMind/nnsslPlans_onemmiso/Dataset745_OpenMind/ds000009/"
              f"{sub}/ses-DEFAULT/{sub}_T1w")
        ds = collection["datasets"].setdefault("ds000009", {"dataset_index": "ds000009", "name": None,
                                                             "dataset_info": None, "subjects": {}})
        ds["subjects"][sub] = {"subject_id": sub, "subject_info": {}, "sessions": {"ses-DEFAULT": {
            "session_id": "ses-DEFAULT", "session_info": None, "images": [{
                "name": f"{sub}_T1w.nii.gz", "modality": "T1w", "image_info": {}, "image_path": pp + ".b2nd",
                "associated_masks": {k: pp + ("__anat.b2nd" if k == "anatomy_mask" else "__anon.b2nd") for k in masks}
                | {k: None for k in ("anatomy_mask", "anonymization_mask") if k not in masks}}]}}}
        truth[sub] = (image, anat, anon if len(masks) == 2 else np.zeros_like(anon))
    json_path = data_dir.parent / "pretrain_data__onemmiso.json"
    json_path.write_text(json.dumps(collection, indent=2))
    return json_path, data_dir, truth


@pytest.mark.parametrize("by_data_dir", [True, False])
def test_reads_nnssl_preprocessed_data(nnssl_folder, by_data_dir):
    json_path, data_dir, truth = nnssl_folder
    found = read_nnssl_preprocessed(json_path, data_dir=data_dir if by_data_dir else None, undo_mask_swap=True)
    assert [im.subject for im in found] == ["sub-01", "sub-02"]
    assert found[0].image_id == "Dataset745_OpenMind__ds000009__sub-01__ses-DEFAULT__sub-01_T1w.nii.gz"
    assert all(im.properties.suffix == ".pkl" for im in found)
    sampler = PatchSampler(found, (40, 40, 40))
    for i, im in enumerate(found):
        image, anat, anon = truth[im.subject]
        patch = sampler.crop(i, np.array(image.shape) // 2)
        lo = np.array(image.shape) // 2 - 20
        inner = tuple(slice(-l, -l + s) for l, s in zip(lo, image.shape))  # the image inside the padded patch
        assert torch.equal(patch["image"][0][inner], torch.from_numpy(image))
        assert torch.equal(patch["anat"][0][inner], torch.from_numpy((anat > 0).astype(np.float32)))
        assert torch.equal(patch["anon"][0][inner], torch.from_numpy((anon > 0).astype(np.float32)))
    # anatomy-aware centres on nnssl's masks (-1 outside the image region counts as background)
    aware, rng = PatchSampler(found, (16, 16, 16), anatomy_aware=True), np.random.default_rng(0)
    anat = truth["sub-02"][1]
    assert all(anat[tuple(aware.sample_centre(1, rng))] == 1 for _ in range(30))


def test_nnssl_mask_swap_is_kept_unless_undone(nnssl_folder):
    json_path, data_dir, _ = nnssl_folder
    as_written = read_nnssl_preprocessed(json_path, data_dir=data_dir)
    fixed = read_nnssl_preprocessed(json_path, data_dir=data_dir, undo_mask_swap=True)
    assert as_written[0].anat.name.endswith("__anat.b2nd") and fixed[0].anat.name.endswith("__anon.b2nd")
    assert as_written[1] == fixed[1]  # one mask only: nnssl stored it right


def test_centre_crop_loader_reads_each_images_centre_as_nnssl(selection, images):
    """nnssl's nnsslCenterCropDataLoader3D (VolumeFusion): the patch's lower corner is
    trunc((shape - patch) / 2) on every axis, zero-padded where the image is smaller (the thin one)."""
    from openmind_bench.pretrain import batches as batch_sources, settings as run_settings

    sampler = PatchSampler(images, PATCH)
    [batch] = list(make_pretrain_loader(selection, PATCH, 6, seed=1, steps=1, augment=False, centre_crop=True))
    for image, image_id in zip(batch["image"], batch["image_id"]):
        index = next(i for i, im in enumerate(images) if im.image_id == image_id)
        lower = [int((s - p) / 2) for s, p in zip(sampler.shape(index), PATCH)]
        assert torch.equal(image, torch.from_numpy(sampler.read(index, lower, PATCH)["image"]))
    assert len(set(batch["image_id"])) > 1
    # The method asks for it; the engine's loader source passes it on.
    s = run_settings.resolve({"patch_size": list(PATCH)}, "volume_fusion", "ResEncTiny", out_dir="unused",
                             train_data=str(selection))
    assert s.loader_sampling == "centre" and not s.loader_augmentation
    [batch_from_source] = list(batch_sources.LoaderBatches(s).train(epoch=0, first_step=0, steps=1, rank=0,
                                                                    world_size=1, batch_size=2, seed=1))
    for image, image_id in zip(batch_from_source["image"], batch_from_source["image_id"]):
        index = next(i for i, im in enumerate(images) if im.image_id == image_id)
        lower = [int((s_ - p) / 2) for s_, p in zip(sampler.shape(index), PATCH)]
        assert torch.equal(image, torch.from_numpy(sampler.read(index, lower, PATCH)["image"]))


def test_the_pretraining_source_seeks_to_any_step_and_keeps_one_loader_per_run(selection, monkeypatch):
    """The engine's loader source: epochs read one stream, so a run resumed at (epoch 1, step 2) by a
    new process gets exactly the batches the uninterrupted run got; one DataLoader serves every
    epoch and one every validation (so `persistent_workers` keeps its workers), with the same
    validation batches each time."""
    from types import SimpleNamespace

    from openmind_bench.data import loader as loader_module
    from openmind_bench.pretrain import batches as sources

    settings = SimpleNamespace(train_data=str(selection), val_data=str(selection), steps_per_epoch=3, seed=5,
                               loader_patch_size=list(PATCH), num_workers=0, anatomy_aware=False,
                               loader_sampling="random", loader_augmentation=False)
    built = []
    real = loader_module.make_pretrain_loader

    def counting(*args, **kwargs):
        built.append(kwargs.get("same_every_pass", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(loader_module, "make_pretrain_loader", counting)
    monkeypatch.setattr("openmind_bench.data.make_pretrain_loader", counting)
    where = dict(rank=0, world_size=1, batch_size=2)

    def epoch(source, e, first=0):
        return batches(source.train(epoch=e, first_step=first, steps=3 - first, seed=100 + e, **where))

    whole = sources.LoaderBatches(settings)
    uncut, vals = [], []
    for e in range(3):
        uncut += epoch(whole, e)
        vals.append(batches(whole.val(steps=2, seed=7, **where)))
    assert built == [False, True]  # one training stream, one validation loader, for three epochs
    for v in vals[1:]:
        assert_same(v, vals[0])

    first_run = sources.LoaderBatches(settings)
    cut = epoch(first_run, 0) + batches(itertools.islice(first_run.train(epoch=1, first_step=0, steps=3, seed=101,
                                                                         **where), 2))
    resumed = sources.LoaderBatches(settings)  # a new process, preempted after step 2 of epoch 1
    cut += epoch(resumed, 1, first=2) + epoch(resumed, 2)
    assert_same(cut, uncut)
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(uncut[:3], uncut[3:6]))
