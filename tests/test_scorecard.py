"""The per-checkpoint scorecard: hand-computed means and deltas at equal epochs and low-data N,
ID/OOD means from the registry, the provenance header, the CLI and its errors."""

from __future__ import annotations

import argparse
import json
import math

import pandas as pd
import pytest
import yaml

from openmind_bench.aggregate.cli import register
from openmind_bench.aggregate.collect import CollectError, find_metrics_files
from openmind_bench.aggregate.scorecard import ScorecardError, scorecard_paths, write_scorecard

from test_aggregate import PROVENANCE, SHA  # one hand-made external checkpoint for both files


def _run(root, dataset, run, fold, cases=None, summary=None, **identity):
    path = root / dataset / run / f"fold_{fold}" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"dataset": dataset, "run": run, "fold": fold, **identity}
    if cases is not None:
        doc["cases"] = [{"case": f"c{i}", "DSC": v} for i, v in enumerate(cases)]
    if summary is not None:
        doc["summary"] = summary
    path.write_text(json.dumps(doc))
    return path


def _results(root):
    """`mine` (external, ResEncL) and the ResEncL scratch runs, full and n=20, plus runs to leave out.

    Per dataset, mean over cases then folds:
      full:  mine  seg_id (0.6+0.8)/2 | 0.8 -> 0.75, seg_ood 0.5, cls_id AUROC 0.9
             scratch seg_id 0.6, seg_ood 0.55, cls_id AUROC 0.7
      n=20:  mine  seg_id 0.4, seg_ood 0.3;  scratch seg_id 0.2 (seg_ood missing)
    """
    mine = dict(method="mine", architecture="ResEncL", schedule="sawtooth", epochs=150, external_checkpoint=PROVENANCE)
    scratch = dict(method="scratch", architecture="ResEncL", epochs=150)
    _run(root, "seg_id", "mine__ResEncL__x__sawtooth__150", 0, [0.6, 0.8], **mine)
    _run(root, "seg_id", "mine__ResEncL__x__sawtooth__150", 1, [0.8], **mine)
    _run(root, "seg_ood", "mine__ResEncL__x__sawtooth__150", 0, [0.5], **mine)
    _run(root, "cls_id", "mine__ResEncL__x__sawtooth__150", "test", summary={"AUROC": 0.9}, **mine)
    _run(root, "seg_id", "scratch__ResEncL__150", 0, [0.6], **scratch)
    _run(root, "seg_id", "scratch__ResEncL__150", 1, [0.6], **scratch)
    _run(root, "seg_ood", "scratch__ResEncL__150", 0, [0.55], **scratch)
    _run(root, "cls_id", "scratch__ResEncL__150", "test", summary={"AUROC": 0.7}, **scratch)
    _run(root, "seg_id", "mine__ResEncL__x__sawtooth__150__n20", 0, [0.4], low_data_n=20, **mine)
    _run(root, "seg_ood", "mine__ResEncL__x__sawtooth__150__n20", 0, [0.3], low_data_n=20, **mine)
    _run(root, "seg_id", "scratch__ResEncL__150__n20", 0, [0.2], low_data_n=20, **scratch)
    # Left out: another architecture's scratch run and one of our own methods.
    _run(root, "seg_id", "scratch__PrimusM__150", 0, [0.99], method="scratch", architecture="PrimusM", epochs=150)
    _run(root, "seg_id", "mae__ResEncL__om__sawtooth__150", 0, [0.99], method="mae", architecture="ResEncL",
         schedule="sawtooth", selection="om", epochs=150)
    return find_metrics_files(root)


def _registry(tmp_path):
    entry = {"task": "seg", "role": "test", "source": "x", "modalities": ["T1w"],
             "labels": {"background": 0, "lesion": 1}, "nsd_tolerance_mm": 1.0}
    datasets = {"seg_id": {**entry, "domain": "id"}, "seg_ood": {**entry, "domain": "ood"},
                "cls_id": {**entry, "task": "cls", "domain": "id", "labels": {"a": 0, "b": 1}}}
    for spec in datasets.values():
        if spec["task"] == "cls":
            del spec["nsd_tolerance_mm"]
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"datasets": datasets}, sort_keys=False))
    return path


def _cell(frame, metric="DSC", scope="dataset", dataset=None, n=None):
    sel = (frame.metric == metric) & (frame.scope == scope)
    sel &= frame.low_data_n.isna() if n is None else frame.low_data_n == n
    if dataset is not None:
        sel &= frame.dataset == dataset
    assert sel.sum() == 1, frame[sel]
    return frame[sel].iloc[0]


def test_scorecard_numbers_by_hand(tmp_path):
    out_csv, out_md = scorecard_paths(tmp_path / "out", "mine")
    frame = write_scorecard(_results(tmp_path / "d"), "mine", out_csv, out_md, registry=_registry(tmp_path))
    assert set(frame.checkpoint) == {"mine"} and set(frame.architecture) == {"ResEncL"}
    assert set(frame.schedule) == {"sawtooth"} and set(frame.epochs) == {"150"}
    seg = _cell(frame, dataset="seg_id")
    assert (seg.checkpoint_mean, seg.scratch_mean, seg.delta_scratch) == (
        pytest.approx(0.75), pytest.approx(0.6), pytest.approx(0.15))
    assert (seg.folds, seg.scratch_folds, seg.domain) == (2, 2, "id")
    assert _cell(frame, dataset="seg_ood").delta_scratch == pytest.approx(-0.05)
    mean = _cell(frame, scope="mean")
    assert (mean.checkpoint_mean, mean.scratch_mean, mean.delta_scratch, mean.datasets) == (
        pytest.approx(0.625), pytest.approx(0.575), pytest.approx(0.05), 2)
    assert _cell(frame, scope="mean_id").checkpoint_mean == pytest.approx(0.75)
    assert _cell(frame, scope="mean_ood").delta_scratch == pytest.approx(-0.05)
    auroc = _cell(frame, metric="AUROC", dataset="cls_id")
    assert auroc.delta_scratch == pytest.approx(0.2) and auroc.folds == 1
    # Low data: compared with scratch at n=20; where scratch has no value the delta stays empty.
    low = _cell(frame, dataset="seg_id", n=20)
    assert (low.scratch_mean, low.delta_scratch) == (pytest.approx(0.2), pytest.approx(0.2))
    assert math.isnan(_cell(frame, dataset="seg_ood", n=20).delta_scratch)
    # The runs outside the checkpoint and its scratch baselines (0.99) are nowhere.
    assert frame.checkpoint_mean.max() < 0.95 and frame.scratch_mean.max() < 0.95
    written = pd.read_csv(out_csv)
    assert list(written.columns[:8]) == ["checkpoint", "architecture", "metric", "schedule", "epochs", "low_data_n",
                                         "scope", "dataset"]
    assert len(written) == len(frame)
    settings = list(dict.fromkeys(zip(written.metric, written.low_data_n.fillna(0))))
    assert settings == [("DSC", 0), ("DSC", 20), ("AUROC", 0)]  # the Markdown's order

    md = out_md.read_text()
    assert md.startswith("# Scorecard: mine")
    assert f"| sha256 | {SHA} |" in md and "| commit | 0123456789abcdef0123456789abcdef01234567 |" in md
    assert "| source | hf://AnonRes/ResEncL-OpenMind-MAE |" in md and "| revision | v1 |" in md
    assert "## Dice similarity coefficient (DSC, %): sawtooth, 150 epochs, all training cases" in md
    assert "## Dice similarity coefficient (DSC, %): sawtooth, 150 epochs, 20 training cases" in md
    assert "| seg_id | ID | 75.00 | 60.00 | +15.00 | 2 / 2 |" in md
    assert "| **Mean** (2 datasets) |  | 62.50 | 57.50 | +5.00 |  |" in md
    assert "| seg_ood | OOD | 30.00 | – | – | 1 |" in md
    # The n=20 means are over different datasets (scratch has no seg_ood), and say so.
    low_mean = _cell(frame, scope="mean", n=20)
    assert (low_mean.datasets, low_mean.scratch_datasets) == (2, 1)
    assert "| **Mean** (2 / 1 datasets) |  | 35.00 | 20.00 | +15.00 |  |" in md
    assert "| **ID mean** (1 dataset) |" in md
    assert md.index("all training cases") < md.index("20 training cases")


def test_scorecard_without_registry_has_no_domain_means(tmp_path):
    out_csv, out_md = scorecard_paths(tmp_path, "mine")
    frame = write_scorecard(_results(tmp_path / "d"), "mine", out_csv, out_md)
    assert set(frame.scope) == {"dataset", "mean"} and frame.domain.isna().all()


def test_scorecard_errors(tmp_path):
    paths = _results(tmp_path / "d")
    out_csv, out_md = scorecard_paths(tmp_path / "out", "other")
    message = r"no runs of external checkpoint 'other' .*external checkpoints there: \['mine'\]"
    with pytest.raises(ScorecardError, match=message):
        write_scorecard(paths, "other", out_csv, out_md)
    own_only = [p for p in paths if "mine" not in str(p)]
    with pytest.raises(ScorecardError, match="none of them is an external checkpoint's run"):
        write_scorecard(own_only, "mine", out_csv, out_md)
    with pytest.raises(ValueError, match="not a valid name"):
        scorecard_paths(tmp_path, "../escape")
    bad = _run(tmp_path / "bad", "seg_id", "r", 0, [0.5], method="mine", architecture="ResEncL", schedule="ft",
               external_checkpoint={"name": "mine"})
    with pytest.raises(CollectError, match="field 'external_checkpoint': 'source' is missing"):
        write_scorecard([bad], "mine", out_csv, out_md)
    assert not (tmp_path / "out").exists()  # nothing written on any error


def test_scorecard_cli(tmp_path, capsys):
    _results(tmp_path / "d")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["scorecard", "--root", str(tmp_path / "d"), "--checkpoint", "mine",
                              "--out-dir", str(tmp_path / "out"), "--registry", str(_registry(tmp_path))])
    assert args.func(args) == 0
    assert (tmp_path / "out" / "scorecard_mine.csv").is_file() and (tmp_path / "out" / "scorecard_mine.md").is_file()
    args = parser.parse_args(["scorecard", "--root", str(tmp_path / "d"), "--checkpoint", "absent",
                              "--out-dir", str(tmp_path / "out")])
    assert args.func(args) == 2
    assert "no runs of external checkpoint 'absent'" in capsys.readouterr().err
