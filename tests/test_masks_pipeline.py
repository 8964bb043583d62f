"""Masks through the chain pre-training reads: a defaced demo image gets masks, is preprocessed with
them, selected, sampled anatomy-aware, and `mae_anat_anon` puts zero loss weight on its truly
anonymised voxels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from openmind_bench import config as cfg
from openmind_bench.bids.index import conform
from openmind_bench.curation import PREPROCESSED_TWIN, run_selection
from openmind_bench.data.images import load_pretrain_images
from openmind_bench.data.sampler import PatchSampler
from openmind_bench.masks.shard import merge_index, run_masks_shard
from openmind_bench.preprocess.image import PreprocessSettings, preprocess_image
from openmind_bench.preprocess.shard import run_preprocess_shard
from openmind_bench.ssl import mae_cnn, parse

REPO = Path(__file__).resolve().parents[1]
REL = "ds990001/sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz"
PATCH = (32, 32, 32)


def test_mae_anat_anon_gives_zero_weight_to_truly_anonymised_voxels(demo_mirror, demo_truth, tmp_path):
    torch.set_num_threads(1)
    config = cfg.validate({"preprocess": {"spacing": [2.0, 2.0, 2.0]}}, REPO / "config" / "schema.yaml")
    truth = demo_truth["images"][REL]
    assert truth["anonymisation"] == "defaced"
    table = tmp_path / "images.parquet"
    conform([{"image_id": "ds990001__sub-01_ses-01_T1w", "dataset": "ds990001", "shard": 0, "subject": "01",
              "session": "01", "modality": "T1w", "suffix": "T1w", "n_volumes": 1, "path": str(demo_mirror / REL)}]
            ).to_parquet(table, index=False)
    run_masks_shard([table], "ds990001", 0, tmp_path / "masks", tmp_path / "masks.parquet", tmp_path / "rej_m.tsv",
                    config["masks"])
    masked = tmp_path / "images_masked.parquet"
    merge_index([table], [tmp_path / "masks.parquet"], masked)
    settings = PreprocessSettings.from_config(config["preprocess"])
    store = tmp_path / "preprocessed"
    manifest = run_preprocess_shard([masked], "ds990001", 0, store, tmp_path / "shard-0.tsv", tmp_path / "rej_p.tsv",
                                    settings)
    assert manifest.anonymization_mask_source[0].endswith("_mask-anonymization.nii.gz")
    sel = tmp_path / "sel"
    run_selection({"name": "demo"}, 1, [masked], [tmp_path / "shard-0.tsv"], sel / "pretrain_data.json",
                  sel / PREPROCESSED_TWIN, sel / "images.tsv")
    method = parse("mae_anat_anon")
    sampler = PatchSampler(load_pretrain_images(sel / PREPROCESSED_TWIN), PATCH, anatomy_aware=method.anatomy_aware)

    # the same image preprocessed with its true masks: the truth on the store's grid
    true = preprocess_image(demo_mirror / REL, settings, anat_mask=demo_mirror / truth["masks"]["anat"],
                            anon_mask=demo_mirror / truth["masks"]["anon"])
    true_anon = true.anon[0] > 0
    shape = np.asarray(sampler.shape(0))
    assert tuple(shape) == true_anon.shape

    # a patch around the true defaced region, as the loader reads it
    centre = np.round(np.argwhere(true_anon).mean(axis=0)).astype(int)
    lower = np.clip(centre - np.asarray(PATCH) // 2, 0, shape - np.asarray(PATCH))
    box = sampler.read(0, lower, PATCH)
    region = tuple(slice(lo, lo + n) for lo, n in zip(lower, PATCH))
    truth_patch = true_anon[region]
    assert truth_patch.sum() > 500
    model = mae_cnn.build(torch.nn.Identity(), {}, PATCH, anon_aware=method.anon_aware, mask_ratio=0.75, block_size=8)
    view = model.make_view({"image": torch.from_numpy(box["image"])[None],
                            "anon": torch.from_numpy(box["anon"]).float()[None]}, seeds=[0])
    weight = view["loss_weight"][0, 0].numpy()
    assert (weight[truth_patch] == 0).mean() >= 0.97
    assert (weight[~truth_patch] > 0).sum() > 1000  # masked real anatomy still counts

    # anatomy-aware centres never fall in the defaced region
    rng = np.random.default_rng(0)
    centres = [sampler.sample_centre(0, rng) for _ in range(50)]
    assert sum(bool(true_anon[tuple(c)]) for c in centres) <= 1
