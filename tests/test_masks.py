"""Masks stage: classical masks against the demo's recorded truth and on images no one here made
(nilearn's MNI template, dipy's b0), release-mask checks, bad input, the shard job, the nnU-Net backend."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from openmind_bench import config as cfg
from openmind_bench.bids.index import conform
from openmind_bench.masks.classical import ClassicalSettings, MaskError, compute_masks
from openmind_bench.masks.release import check_polarity
from openmind_bench.masks.shard import NotRemade, merge_index, missing_outputs, remake_mask, run_masks_shard

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def settings():
    return cfg.validate({}, REPO / "config" / "schema.yaml")["masks"]


@pytest.fixture(scope="module")
def classical(settings):
    return ClassicalSettings.from_config(settings["classical"])


def dice(a, b):
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def demo_results(demo_mirror, demo_truth, classical):
    """Masks of every demo anatomical image with its true masks: {kind: [(anon dice or share, anat dice)]}."""
    out = {}
    for rel, truth in demo_truth["images"].items():
        if truth["modality"] == "DWI":
            continue
        img = nib.load(str(demo_mirror / rel))
        masks = compute_masks(np.asarray(img.dataobj, np.float32), img.affine, classical)
        anon_t = np.asarray(nib.load(str(demo_mirror / truth["masks"]["anon"])).dataobj) > 0
        anat_t = np.asarray(nib.load(str(demo_mirror / truth["masks"]["anat"])).dataobj) > 0
        head = (anon_t | anat_t).sum()
        anon_score = dice(masks.anon, anon_t) if anon_t.any() else float(masks.anon.sum()) / head
        out.setdefault(truth["anonymisation"], []).append((rel, anon_score, dice(masks.anat, anat_t), masks.kind))
    return out


@pytest.mark.parametrize("kind", ["defaced", "face_blurred", "skull_stripped"])
def test_anonymisation_mask_matches_the_demo_truth(demo_results, kind):
    rows = demo_results[kind]
    assert len(rows) >= 4
    for rel, anon_dice, anat_dice, found in rows:
        assert anon_dice >= 0.8, (rel, anon_dice)
        assert anat_dice >= 0.9, (rel, anat_dice)
        assert found == kind, (rel, found)


def test_intact_heads_get_an_empty_anonymisation_mask(demo_results):
    rows = demo_results["none"]
    assert len(rows) >= 3
    for rel, share, anat_dice, found in rows:
        assert share < 0.01, (rel, share)
        assert anat_dice >= 0.9, (rel, anat_dice)
        assert found == "none"


def _rician(image, sigma, rng):
    return np.sqrt((image + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)


def test_mni_template_defaced_by_the_test(classical):
    from nilearn import datasets

    tpl = datasets.load_mni152_template(resolution=2)
    data = np.asarray(tpl.dataobj, np.float32)
    head = ndi.binary_fill_holes(data > 0.05 * data.max())
    noisy = _rician(data, 0.02 * float(data.max()), np.random.default_rng(0)).astype(np.float32)
    intact = compute_masks(noisy, tpl.affine, classical)
    assert intact.anon.sum() < 0.01 * head.sum()
    assert dice(intact.anat, head) >= 0.9
    # deface: zero the anterior-inferior part of the head (world y > 20 mm, z < 0 mm)
    ijk = np.indices(data.shape).reshape(3, -1)
    xyz = (tpl.affine[:3, :3] @ ijk + tpl.affine[:3, 3:]).reshape((3,) + data.shape)
    region = head & (xyz[1] > 20) & (xyz[2] < 0)
    assert region.sum() > 1000
    defaced = np.where(region, 0.0, noisy).astype(np.float32)
    masks = compute_masks(defaced, tpl.affine, classical)
    assert masks.kind == "defaced"
    assert dice(masks.anon, region) >= 0.8
    assert dice(masks.anat, head & ~region) >= 0.9


def test_dipy_b0_defaced_by_the_test(classical):
    from dipy.data import get_fnames

    img = nib.load(get_fnames(name="aniso_vox"))
    data = np.asarray(img.dataobj, np.float32)
    head = ndi.binary_fill_holes(ndi.gaussian_filter(data, 1) > 0.1 * np.percentile(data, 99))
    intact = compute_masks(data, img.affine, classical)
    assert intact.anon.sum() < 0.01 * head.sum()
    region = head.copy()
    region[:, : data.shape[1] // 3] = False  # a known block: one third of the head along y
    region[:, :, data.shape[2] // 2:] = False
    assert region.sum() > 500
    masks = compute_masks(np.where(region, 0.0, data), img.affine, classical)
    assert dice(masks.anon, region) >= 0.8


@pytest.mark.parametrize("volume, match", [
    (np.zeros((20, 20, 20), np.float32), "constant image"),
    (np.full((20, 20, 20), 7.0, np.float32), "constant image"),
])
def test_images_without_a_head_are_refused(classical, volume, match):
    with pytest.raises(MaskError, match=match):
        compute_masks(volume, np.eye(4), classical)


def test_polarity_check_flags_inverted_masks():
    rng = np.random.default_rng(1)
    image = rng.normal(0, 0.02, (30, 30, 30)).astype(np.float32)
    head = np.zeros(image.shape, bool)
    head[5:25, 5:25, 5:25] = True
    face = head & (np.indices(image.shape)[1] > 20)
    image[head & ~face] += 1.0
    assert check_polarity(image, head & ~face, face, 0.5, 0.5) == []
    problems = check_polarity(image, ~(head & ~face), ~face, 0.5, 0.5)
    assert len(problems) == 2 and all("looks inverted" in p for p in problems)


def _table(tmp_path, rows):
    full = []
    for r in rows:
        full.append({"dataset": "ds000001", "shard": 0, "modality": "T1w", "suffix": "T1w", "n_volumes": 1,
                     "derived_from": "", "anat_mask": "", "anon_mask": "", "session": "", **r})
    path = tmp_path / "images.parquet"
    conform(full).to_parquet(path, index=False)
    return path


def test_shard_job_records_bad_input_and_finishes(tmp_path, settings):
    """A good image gets mask files; an all-zero image, a release mask on another grid and an inverted
    release mask are recorded in the shard's rejection part; the shard finishes."""
    from nilearn import datasets

    tpl = datasets.load_mni152_template(resolution=2)
    data = _rician(np.asarray(tpl.dataobj, np.float32), 2.0, np.random.default_rng(0)).astype(np.float32)
    good = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(data, tpl.affine), good)
    empty = tmp_path / "sub-02_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), empty)
    wrong_grid = tmp_path / "wrong_anon.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), wrong_grid)
    head = ndi.binary_fill_holes(data > 0.1 * data.max())
    inverted = tmp_path / "inverted_anon.nii.gz"
    nib.save(nib.Nifti1Image(head.astype(np.uint8), tpl.affine), inverted)
    table = _table(tmp_path, [
        {"image_id": "ds000001__sub-01_T1w", "subject": "01", "path": str(good)},
        {"image_id": "ds000001__sub-02_T1w", "subject": "02", "path": str(empty)},
        {"image_id": "ds000001__sub-03_T1w", "subject": "03", "path": str(good), "anon_mask": str(wrong_grid)},
        {"image_id": "ds000001__sub-04_T1w", "subject": "04", "path": str(good), "anon_mask": str(inverted)},
    ])
    out = run_masks_shard([table], "ds000001", 0, tmp_path / "masks", tmp_path / "shard.parquet",
                          tmp_path / "rejected.tsv", settings)
    assert set(out.image_id) == {"ds000001__sub-01_T1w", "ds000001__sub-03_T1w", "ds000001__sub-04_T1w"}
    rejected = pd.read_csv(tmp_path / "rejected.tsv", sep="\t")
    assert set(rejected.stage) == {"masks"}
    reasons = dict(zip(rejected.image, rejected.reason))
    assert "constant image" in reasons["ds000001__sub-02_T1w"]
    assert "has shape (10, 10, 10)" in reasons["ds000001__sub-03_T1w"]
    assert "looks inverted" in reasons["ds000001__sub-04_T1w"]
    row = out.set_index("image_id").loc["ds000001__sub-01_T1w"]
    assert row.anat_mask.endswith("sub-01/sub-01_T1w_mask-anatomy.nii.gz")
    anat = nib.load(row.anat_mask)
    assert anat.shape == data.shape and np.allclose(anat.affine, tpl.affine)
    # the masked index: the unmaskable image is left out, the others carry their mask paths
    merged = merge_index([table], [tmp_path / "shard.parquet"], tmp_path / "masked.parquet")
    assert "ds000001__sub-02_T1w" not in set(merged.image_id)
    assert merged.set_index("image_id").loc["ds000001__sub-04_T1w"].anon_mask.endswith("_mask-anonymization.nii.gz")


def _defaced_template(folder):
    """The MNI152 template with Rician noise and its face zeroed, saved as sub-01_T1w: (path, head, face, affine)."""
    from nilearn import datasets

    tpl = datasets.load_mni152_template(resolution=2)
    data = _rician(np.asarray(tpl.dataobj, np.float32), 2.0, np.random.default_rng(0)).astype(np.float32)
    head = ndi.binary_fill_holes(data > 0.1 * data.max())
    face = head & (np.indices(data.shape)[1] > 80)
    data[face] = 0
    image = folder / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(data, tpl.affine), image)
    return image, head, face, tpl.affine


def test_release_masks_that_pass_are_used_as_shipped(tmp_path, settings):
    image, head, face, affine = _defaced_template(tmp_path)
    paths = {}
    for kind, mask in (("anat", head & ~face), ("anon", face)):
        paths[kind] = tmp_path / f"release_{kind}.nii.gz"
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), paths[kind])
    table = _table(tmp_path, [{"image_id": "ds000001__sub-01_T1w", "subject": "01", "path": str(image),
                               "anat_mask": str(paths["anat"]), "anon_mask": str(paths["anon"])}])
    out = run_masks_shard([table], "ds000001", 0, tmp_path / "masks", tmp_path / "shard.parquet",
                          tmp_path / "rejected.tsv", settings)
    row = out.iloc[0]
    assert (row.anat_mask, row.anon_mask) == (str(paths["anat"]), str(paths["anon"]))
    assert row.anatomy_source == "release" and row.mask_kind == "release"
    assert len(pd.read_csv(tmp_path / "rejected.tsv", sep="\t")) == 0


def test_a_deleted_mask_is_listed_and_remade_byte_identical_and_a_release_mask_is_not(tmp_path, settings):
    """Rule masks_image's function: a computed mask deleted after its shard ran is listed as missing and
    re-made exactly; a file the stage never wrote (the image keeps its release mask) is refused with
    the shard command named."""
    image, head, face, affine = _defaced_template(tmp_path)
    release_anon = tmp_path / "release_anon.nii.gz"
    nib.save(nib.Nifti1Image(face.astype(np.uint8), affine), release_anon)
    table = _table(tmp_path, [{"image_id": "ds000001__sub-01_T1w", "subject": "01", "path": str(image),
                               "anon_mask": str(release_anon)},
                              {"image_id": "ds000001__sub-02_T1w", "subject": "02", "path": str(image)}])
    masks = tmp_path / "masks"
    shard_table = masks / "ds000001/shard-0.parquet"  # the masks live under the tables' folder
    out = run_masks_shard([table], "ds000001", 0, masks, shard_table, tmp_path / "rejected.tsv", settings)
    first, second = out.iloc[0], out.iloc[1]
    assert first.anonymization_source == "release" and first.anatomy_source == "classical"
    written = [first.anat_mask, second.anat_mask, second.anon_mask]
    before = {p: Path(p).read_bytes() for p in written}
    assert missing_outputs([shard_table]) == []
    Path(second.anat_mask).unlink()
    assert missing_outputs([shard_table]) == [second.anat_mask]
    remake_mask([table], shard_table, "ds000001", second.anat_mask, settings)
    assert {p: Path(p).read_bytes() for p in written} == before
    ours = masks / "ds000001/sub-01/sub-01_T1w_mask-anonymization.nii.gz"  # the release's mask is used instead
    with pytest.raises(NotRemade, match=rf"lists no image .*snakemake {shard_table} --forcerun masks_shard"):
        remake_mask([table], shard_table, "ds000001", ours, settings)
    assert not ours.exists()


def _tiny_nnunet_model(folder: Path, winning_label: int) -> None:
    """An nnU-Net v2 model folder (dataset.json, plans.json, fold_0/checkpoint_final.pth) with a
    two-stage PlainConvUNet whose last layer always votes for `winning_label`."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
            "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    plans = {
        "dataset_name": "Dataset999_TinyMasks", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 2.0, 2.0],
        "original_median_shape_after_transp": [24, 24, 24], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": [16, 16, 16], "median_image_size_in_voxels": [24, 24, 24],
            "spacing": [2.0, 2.0, 2.0], "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": arch, "batch_dice": False,
        }},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 1.0, "mean": 0.5, "median": 0.5, "min": 0.0, "percentile_00_5": 0.0, "percentile_99_5": 1.0,
            "std": 0.2}},
    }
    dataset = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "anatomy": 1, "anonymized": 2},
               "numTraining": 1, "file_ending": ".nii.gz"}
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    pm = PlansManager(plans)
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3,
                                                   enable_deep_supervision=False)
    head = net.decoder.seg_layers[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
        head.bias[winning_label] = 5.0
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": None},
               folder / "fold_0" / "checkpoint_final.pth")


@pytest.mark.parametrize("winning_label", [1, 2])
def test_nnunet_backend_runs_a_model_folder(tmp_path, settings, winning_label):
    pytest.importorskip("nnunetv2")
    import torch

    from openmind_bench.masks.shard import make_masker

    torch.set_num_threads(1)
    folder = tmp_path / "model"
    _tiny_nnunet_model(folder, winning_label)
    masker = make_masker({**settings, "backend": "nnunet", "nnunet": {**settings["nnunet"], "model_folder": str(folder)}})
    rng = np.random.default_rng(0)
    data = rng.random((20, 22, 18)).astype(np.float32)  # anisotropic shape: catches transposed axes
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    masks = masker(data, affine)
    assert masks.anat.shape == data.shape and masks.anon.shape == data.shape
    assert masks.kind == "nnunet"
    if winning_label == 1:
        assert masks.anat.all() and not masks.anon.any()
    else:
        assert masks.anon.all() and not masks.anat.any()


def test_nnunet_backend_needs_a_model_folder(settings):
    from openmind_bench.masks.shard import make_masker

    with pytest.raises(ValueError, match="model_folder"):
        make_masker({**settings, "backend": "nnunet"})


def test_cli_masks_and_quality_verbs(tmp_path):
    from openmind_bench.cli import main

    rng = np.random.default_rng(0)
    data = rng.normal(0, 0.02, (40, 40, 40)).astype(np.float32)
    data[10:30, 10:30, 10:30] += 1.0 + 0.1 * rng.random((20, 20, 20)).astype(np.float32)
    data = np.abs(data)
    image = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), image)
    table = _table(tmp_path, [{"image_id": "ds000001__sub-01_T1w", "subject": "01", "path": str(image)}])
    assert main(["masks", "--index", str(table), "--dataset", "ds000001", "--shard", "0", "--out",
                 str(tmp_path / "m.parquet"), "--rejected", str(tmp_path / "rm.tsv"),
                 "--out-root", str(tmp_path / "masks")]) == 0
    masks = pd.read_parquet(tmp_path / "m.parquet")
    assert masks.mask_kind.tolist() == ["none"] and 0.12 <= masks.anatomy_fraction[0] <= 0.18  # the 20^3 cube, its edge voxels included
    merge_index([table], [tmp_path / "m.parquet"], tmp_path / "masked.parquet")
    assert main(["quality", "--index", str(tmp_path / "masked.parquet"), "--dataset", "ds000001", "--shard", "0",
                 "--out", str(tmp_path / "q.parquet"), "--rejected", str(tmp_path / "rq.tsv")]) == 0
    assert 1 <= pd.read_parquet(tmp_path / "q.parquet").image_score[0] <= 5
