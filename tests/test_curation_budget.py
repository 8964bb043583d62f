"""The `budget` selection (pulp integer program) against greedy, the paper's filters as config
entries, and leakage: downstream test subjects that live on OpenNeuro are never selected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from openmind_bench import config as cfg
from openmind_bench.bids.index import conform
from openmind_bench.curation import PREPROCESSED_TWIN, run_selection
from openmind_bench.curation.budget import drop_test_subjects, greedy_budget, solve_budget, weights
from openmind_bench.registry import downstream_test_subjects
from openmind_bench.preprocess.shard import MANIFEST_COLUMNS

REPO = Path(__file__).resolve().parents[1]


def test_budget_beats_greedy_and_respects_every_constraint():
    # greedy (best weight per voxel first) takes the small image A and then fits nothing else;
    # the optimum leaves A out and takes B and C, which fill the budget exactly
    images = pd.DataFrame({"image_id": ["A", "B", "C", "D", "E"],
                           "dataset": ["ds1", "ds1", "ds2", "ds2", "ds2"],
                           "modality": ["T1w", "T1w", "T2w", "T1w", "T2w"]})
    cost = np.array([2.0, 5.0, 5.0, 5.0, 5.0])
    weight = np.array([2.0, 4.5, 4.5, 4.0, 4.0])
    budget = 10.0
    greedy = greedy_budget(images, cost, weight, budget, max_per_dataset=2, max_per_modality=2)
    best = solve_budget(images, cost, weight, budget, max_per_dataset=2, max_per_modality=2)
    picked = images.image_id.isin(best.image_id).to_numpy()
    assert sorted(best.image_id) == ["B", "C"]
    assert weight[picked].sum() > weight[images.image_id.isin(greedy.image_id).to_numpy()].sum()
    assert cost[picked].sum() <= budget
    assert best.dataset.value_counts().max() <= 2 and best.modality.value_counts().max() <= 2


@pytest.mark.parametrize("seed", range(5))
def test_budget_caps_hold_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n = 40
    images = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)],
                           "dataset": rng.choice(["ds1", "ds2", "ds3"], n),
                           "modality": rng.choice(["T1w", "T2w", "FLAIR"], n)})
    cost = rng.uniform(1, 10, n)
    weight = weights(pd.Series(rng.choice([1.0, 2.5, 4.0, np.nan], n)), 3.0)
    best = solve_budget(images, cost, weight, 60.0, max_per_dataset=5, max_per_modality=6)
    greedy = greedy_budget(images, cost, weight, 60.0, max_per_dataset=5, max_per_modality=6)
    picked = images.image_id.isin(best.image_id).to_numpy()
    assert cost[picked].sum() <= 60.0 + 1e-9
    assert best.dataset.value_counts().max() <= 5 and best.modality.value_counts().max() <= 6
    assert weight[picked].sum() >= weight[images.image_id.isin(greedy.image_id).to_numpy()].sum() - 1e-9


def test_weights_prefer_better_scores():
    w = weights(pd.Series([1.0, 3.0, 5.0, np.nan]), 2.5)
    assert w.tolist() == [5.0, 3.0, 1.0, 2.5]


def test_the_paper_filters_are_config_entries():
    config = cfg.validate(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), REPO / "config" / "schema.yaml")
    selections = {s["name"]: s for s in config["selections"]}
    assert [selections[f"iqs_le_{t}"]["max_quality_score"] for t in ("1.5", "2.5", "3.0")] == [1.5, 2.5, 3.0]
    assert selections["t1w_t2w_flair"]["modalities"] == ["T1w", "T2w", "FLAIR"]
    assert selections["budget"]["budget"]["unit"] == "voxels"


@pytest.fixture()
def workspace(tmp_path):
    rows, written = [], []
    spec = [("ds000001", "01", "T1w", 1.0), ("ds000001", "02", "T1w", 2.0), ("ds000002", "07", "T2w", 1.5),
            ("ds000002", "08", "FLAIR", 4.0), ("ds000003", "01", "T1w", 1.0)]
    for ds, sub, modality, score in spec:
        iid = f"{ds}__sub-{sub}_{modality}"
        rows.append({"image_id": iid, "dataset": ds, "subject": sub, "session": "", "modality": modality,
                     "path": f"raw/{ds}/sub-{sub}/anat/sub-{sub}_{modality}.nii.gz", "quality_score": score})
        folder = f"pre/{ds}/sub-{sub}/{iid}"
        written.append({"image_id": iid, "dataset": ds, "shard": 0, "subject": sub, "session": "",
                        "modality": modality, "image": f"{folder}.b2nd", "anon": f"{folder}__anon.b2nd",
                        "anat": f"{folder}__anat.b2nd", "properties": f"{folder}.json", "shape": "10x10x10",
                        "spacing": "1x1x1", "anatomy_mask_source": "x", "anonymization_mask_source": "x",
                        "anatomy_fraction": 1.0, "anonymized_fraction": 0.0})
    index = tmp_path / "images.parquet"
    conform(rows).to_parquet(index, index=False)
    manifest = tmp_path / "manifest.tsv"
    pd.DataFrame(written, columns=MANIFEST_COLUMNS).to_csv(manifest, sep="\t", index=False)
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"datasets": {
        "TST": {"task": "seg", "role": "test", "openneuro": {"dataset": "ds000001", "subjects": ["sub-02"]}},
        "WHL": {"task": "seg", "role": "test", "openneuro": {"dataset": "ds000003"}},
        "DEV": {"task": "seg", "role": "dev", "openneuro": {"dataset": "ds000002"}},
    }}))
    return tmp_path, index, manifest, registry


def _select(workspace, selection):
    root, index, manifest, registry = workspace
    out = root / "sel" / selection["name"]
    return run_selection(selection, 1, [index], [manifest], out / "pretrain_data.json", out / PREPROCESSED_TWIN,
                         out / "images.tsv", excluded_subjects=downstream_test_subjects(registry))


def test_downstream_test_subjects_are_never_selected(workspace):
    _, _, _, registry = workspace
    assert downstream_test_subjects(registry) == {("ds000001", "02"), ("ds000003", "*")}
    for selection in ({"name": "all"}, {"name": "q", "max_quality_score": 2.5},
                      {"name": "b", "budget": {"limit": 1e9, "unit": "voxels", "unscored_weight": 3.0}}):
        chosen = _select(workspace, selection)
        assert "ds000001__sub-02_T1w" not in set(chosen.image_id), selection
        assert "ds000003" not in set(chosen.dataset), selection
        assert "ds000001__sub-01_T1w" in set(chosen.image_id)
    # a development set's subjects stay available
    assert "ds000002__sub-07_T2w" in set(_select(workspace, {"name": "all"}).image_id)


def test_budget_selection_through_run_selection(workspace):
    # 1000 voxels per image, room for two; per-dataset cap 1: the two best-scored datasets' best images
    chosen = _select(workspace, {"name": "b", "budget": {"limit": 2000, "unit": "voxels", "max_per_dataset": 1,
                                                         "max_per_modality": None, "unscored_weight": 3.0}})
    assert sorted(chosen.image_id) == ["ds000001__sub-01_T1w", "ds000002__sub-07_T2w"]


def test_registry_openneuro_field_needs_a_dataset(tmp_path):
    registry = tmp_path / "r.yaml"
    registry.write_text(yaml.safe_dump({"datasets": {"X": {"role": "test", "openneuro": {"subjects": ["01"]}}}}))
    with pytest.raises(ValueError, match="needs a 'dataset'"):
        downstream_test_subjects(registry)


def test_drop_test_subjects_without_registry_keeps_everything():
    images = pd.DataFrame({"dataset": ["ds1"], "subject": ["01"]})
    assert len(drop_test_subjects(images, downstream_test_subjects(None))) == 1
