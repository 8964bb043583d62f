"""Aggregation: table numbers, ranks, bootstrap, renderings, figures, input errors, collect."""

from __future__ import annotations

import argparse
import json
import logging
import re
import struct

import numpy as np
import pandas as pd
import pytest

from openmind_bench.aggregate import ResultsFormatError
from openmind_bench.aggregate.bootstrap import Draws, bootstrap, draw_cases, resampled_values
from openmind_bench.aggregate.cli import register
from openmind_bench.aggregate.collect import (
    CollectError,
    collect,
    external_checkpoints,
    find_metrics_files,
    gather,
    read_external_checkpoints,
    write_results,
)
from openmind_bench.aggregate.ranking import average_rank, leaderboard_position
from openmind_bench.registry import RegistryError, load_registry, usable_datasets
from openmind_bench.aggregate.results import dataset_values, read_results
from openmind_bench.aggregate.table import build_table, dataset_columns, render_latex, render_markdown

HEADER = "method,architecture,schedule,dataset,metric,value,fold,case\n"

# Per-dataset values chosen so that the ranks are known by hand:
#   d_1: A .8, B .8, C .6, scratch .7  -> A 1.5, B 1.5, scratch 3, C 4
#   d_2: A .5, B .7, C .7, scratch .7  -> B, C, scratch 2 each, A 4
TIES = """\
A,cnn,ft,d_1,DSC,0.8,,
B,cnn,ft,d_1,DSC,0.8,,
C,cnn,ft,d_1,DSC,0.6,,
scratch,cnn,none,d_1,DSC,0.7,,
A,cnn,ft,d_2,DSC,0.5,,
B,cnn,ft,d_2,DSC,0.7,,
C,cnn,ft,d_2,DSC,0.7,,
scratch,cnn,none,d_2,DSC,0.7,,
"""


def write(tmp_path, body: str, name: str = "results.csv", header: str = HEADER):
    path = tmp_path / name
    path.write_text(header + body)
    return path


def row(table: pd.DataFrame, method: str, metric: str = "DSC", architecture: str | None = None) -> pd.Series:
    sel = (table.method == method) & (table.metric == metric)
    if architecture is not None:
        sel &= table.architecture == architecture
    assert sel.sum() == 1, table[sel]
    return table[sel].iloc[0]


SEG_ENTRY = {"task": "seg", "role": "test", "domain": "id", "source": "x", "modalities": ["T1w"],
             "labels": {"background": 0, "lesion": 1}, "nsd_tolerance_mm": 1.0}


def registry_file(tmp_path, datasets: dict) -> str:
    """A registry whose entries are complete segmentation sets but for the fields given (None = left out)."""
    import yaml

    entries = {name: {k: v for k, v in {**SEG_ENTRY, **fields}.items() if v is not None}
               for name, fields in datasets.items()}
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"datasets": entries}, sort_keys=False))
    return str(path)


# --------------------------------------------------------------------------------------- table


def test_average_rank_with_ties_is_exact(tmp_path):
    table = build_table(read_results(write(tmp_path, TIES)), {})
    expected = {"A": 2.75, "B": 1.75, "C": 3.0, "scratch": 2.5}
    for method, avg in expected.items():
        assert row(table, method).avg_rank == pytest.approx(avg, abs=1e-12)
    assert row(table, "B")["mean"] == pytest.approx(0.75)
    assert row(table, "A")["mean"] == pytest.approx(0.65)


def test_ranking_helpers_share_mean_rank_and_min_position():
    values = np.array([[0.8, 0.5], [0.8, 0.7], [0.6, 0.7], [0.7, 0.7]])
    np.testing.assert_allclose(average_rank(values), [2.75, 1.75, 3.0, 2.5])
    np.testing.assert_array_equal(leaderboard_position(np.array([2.0, 1.0, 2.0, 3.5])), [2, 1, 2, 4])


def test_delta_scratch_per_architecture(tmp_path):
    body = TIES + "A,vit,ft,d_1,DSC,0.9,,\nscratch,vit,none,d_1,DSC,0.6,,\nA,other,ft,d_1,DSC,0.9,,\n"
    table = build_table(read_results(write(tmp_path, body)), {})
    assert row(table, "A", architecture="cnn").delta_scratch == pytest.approx(0.65 - 0.70)
    assert row(table, "B", architecture="cnn").delta_scratch == pytest.approx(0.75 - 0.70)
    assert row(table, "A", architecture="vit").delta_scratch == pytest.approx(0.3)
    assert np.isnan(row(table, "A", architecture="other").delta_scratch)  # no scratch row there
    assert np.isnan(row(table, "scratch", architecture="cnn").delta_scratch)  # the reference itself


def test_mean_over_cases_then_folds(tmp_path):
    # fold 0: mean .4 over three cases; fold 1: one case, 1.0 -> .7 (pooled over cases would be .55)
    body = "".join(f"A,cnn,ft,d_1,DSC,{v},0,c{i}\n" for i, v in enumerate([0.2, 0.4, 0.6]))
    body += "A,cnn,ft,d_1,DSC,1.0,1,c9\nB,cnn,ft,d_1,DSC,0.5,0,\nB,cnn,ft,d_1,DSC,0.7,1,\n"
    table = build_table(read_results(write(tmp_path, body)), {})
    assert row(table, "A").d_1 == pytest.approx(0.7)
    assert row(table, "B").d_1 == pytest.approx(0.6)
    assert row(table, "A").avg_rank == 1.0


def test_missing_combination_excluded_and_named(tmp_path, caplog):
    body = TIES.replace("C,cnn,ft,d_2,DSC,0.7,,\n", "")
    with caplog.at_level(logging.WARNING):
        table = build_table(read_results(write(tmp_path, body)), {})
    c = row(table, "C")
    assert np.isnan(c.d_2)
    assert c["mean"] == pytest.approx(0.6)  # d_1 only
    assert c.avg_rank == pytest.approx(4.0)  # its d_1 rank only
    # d_2 without C: B and scratch tie for 1-2 (1.5 each), A is 3.
    assert row(table, "A").avg_rank == pytest.approx((1.5 + 3) / 2)
    assert row(table, "B").avg_rank == pytest.approx((1.5 + 1.5) / 2)
    assert "C / cnn / ft on d_2" in caplog.text
    md = render_markdown(table)
    assert re.search(r"\| C \| cnn \| ft \| 60\.00 \| – \|", md)


def test_id_ood_means_from_registry(tmp_path, caplog):
    results = read_results(write(tmp_path, TIES))
    reg = registry_file(tmp_path, {"d_2": {"task": "seg", "domain": "ood"}, "d_1": {"task": "seg", "domain": "id"}})
    table = build_table(results, usable_datasets(reg))
    a = row(table, "A")
    assert (a.mean_id, a.mean_ood) == (pytest.approx(0.8), pytest.approx(0.5))
    assert dataset_columns(table) == ["d_2", "d_1"]  # registry order
    # One dataset without a domain (an unusable entry): both empty, with a warning naming it.
    reg = registry_file(tmp_path, {"d_1": {"domain": "id"}, "d_2": {"domain": None}})
    with caplog.at_level(logging.WARNING):
        table = build_table(results, usable_datasets(reg))
    assert table.mean_id.isna().all() and table.mean_ood.isna().all()
    assert "d_2" in caplog.text
    # No registry file at all.
    table = build_table(results, usable_datasets(tmp_path / "absent.yaml"))
    assert table.mean_id.isna().all()


def test_registry_rejects_invalid_values(tmp_path):
    registry = load_registry(registry_file(tmp_path, {"d_1": {"domain": "inside"}, "d_2": {}}))
    assert list(registry.datasets) == ["d_2"]
    assert re.search(r"datasets\.d_1\.domain: 'inside' is not one of", registry.errors["d_1"])
    with pytest.raises(RegistryError, match="d_1.domain"):
        registry.get("d_1")


# ----------------------------------------------------------------------------------- renderings


def _md_block(md: str, title_start: str) -> list[list[str]]:
    block = md.split(f"## {title_start}")[1].split("\n## ")[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[:1] + lines[2:]]


def test_markdown_bolds_best_per_column(tmp_path):
    table = build_table(read_results(write(tmp_path, TIES)), {})
    rows = _md_block(render_markdown(table), "Dice")
    header, body = rows[0], rows[1:]
    assert header[:5] == ["Method", "Architecture", "Schedule", "d_1", "d_2"]
    col = {h: i for i, h in enumerate(header)}
    bold = {h: sorted(r[0] for r in body if r[col[h]].startswith("**")) for h in header[3:]}
    assert bold["d_1"] == ["A", "B"]  # tie at 80.00
    assert bold["d_2"] == ["B", "C", "scratch"]
    assert bold["Mean"] == ["B"]
    assert bold["Avg. rank"] == ["B"]  # lowest is best
    assert bold["Δ scratch"] == ["B"]
    b = next(r for r in body if r[0] == "B")
    assert b[col["Mean"]] == "**75.00**" and b[col["Δ scratch"]] == "**+5.00**"


def _unescaped(text: str, ch: str) -> int:
    return len(re.findall(r"(?<!\\)" + re.escape(ch), text))


def test_latex_structure(tmp_path):
    body = TIES + "A,cnn,ft,c_1,balanced_accuracy,0.61,,\nB,cnn,ft,c_1,balanced_accuracy,0.6,,\n"
    tex = render_latex(build_table(read_results(write(tmp_path, body)), {}))
    assert _unescaped(tex, "{") == _unescaped(tex, "}")
    assert tex.count(r"\begin{tabular}") == 2 == tex.count(r"\end{tabular}") == tex.count(r"\bottomrule")
    for spec, body_ in re.findall(r"\\begin\{tabular\}\{([lr]+)\}\n(.*?)\\end\{tabular\}", tex, re.S):
        rows = [ln for ln in body_.splitlines() if ln.endswith(r"\\")]
        assert len(rows) >= 3
        for line in rows:
            assert _unescaped(line, "&") + 1 == len(spec), line
    assert r"d\_1" in tex and "d_1" not in tex.replace(r"d\_1", "")
    assert r"$-$5.00" in tex and not re.search(r"& -\d", tex)  # deltas of A and C: a real minus sign
    assert r"\midrule" in tex and r"\toprule" in tex


# ------------------------------------------------------------------------------------ bootstrap


def _cases_body(seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for method, shift in (("A", 0.0), ("B", 0.01), ("scratch", -0.01)):
        schedule = "none" if method == "scratch" else "ft"
        for dataset in ("d_1", "d_2"):
            for fold in (0, 1):
                for case in range(8):
                    v = float(np.clip(0.6 + shift + rng.normal(0, 0.1), 0, 1))
                    lines.append(f"{method},cnn,{schedule},{dataset},DSC,{v!r},{fold},{dataset}_{fold}_{case}")
        lines.append(f"{method},cnn,{schedule},c_1,AUROC,{0.7 + shift},,")  # held fixed
    return "\n".join(lines) + "\n"


def test_bootstrap_is_reproducible_under_a_seed(tmp_path):
    frame = read_results(write(tmp_path, _cases_body()))
    first, again = bootstrap(frame, 200, seed=7), bootstrap(frame, 200, seed=7)
    other = bootstrap(frame, 200, seed=8)
    assert first.ranks.to_csv(index=False) == again.ranks.to_csv(index=False)
    assert first.intervals.to_csv(index=False) == again.intervals.to_csv(index=False)
    assert first.intervals.to_csv(index=False) != other.intervals.to_csv(index=False)


def test_bootstrap_shares_and_fixed_datasets(tmp_path):
    frame = read_results(write(tmp_path, _cases_body()))
    result = bootstrap(frame, 300, seed=0)
    ranks = result.ranks
    shares = ranks.filter(like="share_rank_")
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    assert {"rank_mean", "rank_std", "rank_observed"} <= set(ranks.columns)
    # AUROC has only per-dataset values: every sample equals the observed ranking.
    auroc = ranks[ranks.metric == "AUROC"].set_index("method")
    assert auroc.loc["B", "share_rank_1"] == 1.0 and auroc.loc["B", "rank_std"] == 0.0
    assert (auroc.loc["B", "datasets_resampled"], auroc.loc["B", "datasets_fixed"]) == (0, 1)
    assert (ranks[ranks.metric == "DSC"].datasets_resampled == 2).all()
    fixed = result.intervals[result.intervals.metric == "AUROC"]
    assert not fixed.resampled.any() and (fixed.ci_low == fixed.value).all()
    dsc = result.intervals[result.intervals.metric == "DSC"]
    assert dsc.resampled.all() and (dsc.ci_low < dsc.value).all() and (dsc.value < dsc.ci_high).all()


def test_bootstrap_with_unit_counts_reproduces_the_table(tmp_path):
    frame = read_results(write(tmp_path, _cases_body()))
    draws = draw_cases(frame, 1, seed=0)
    ones = Draws(1, {k: (units, np.ones_like(c)) for k, (units, c) in draws.counts.items()})
    observed = dataset_values(frame).xs("DSC", level="metric").unstack("dataset")
    runs, datasets = list(observed.index), list(observed.columns)
    np.testing.assert_allclose(resampled_values(frame, "DSC", runs, datasets, ones)[0], observed.to_numpy())


def test_bootstrap_clear_winner_always_first(tmp_path):
    lines = [
        f"{m},cnn,ft,d_1,DSC,{base + 0.01 * (i % 3)},0,k{i}"
        for m, base in (("best", 0.9), ("worst", 0.1))
        for i in range(10)
    ]
    frame = read_results(write(tmp_path, "\n".join(lines) + "\n"))
    ranks = bootstrap(frame, 100, seed=1).ranks.set_index("method")
    assert ranks.loc["best", "share_rank_1"] == 1.0 and ranks.loc["worst", "share_rank_2"] == 1.0


# ------------------------------------------------------------------------- whole stage, figures


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_cli_writes_every_output_and_readable_figures(tmp_path):
    body = "\n".join(ln for ln in _cases_body().splitlines() if ",d_2," not in ln) + "\n"
    results = write(tmp_path, body)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["aggregate", "--results", str(results), "--out", str(out), "--bootstrap", "50"])
    assert args.func(args) == 0
    for name in ("benchmark_table.csv", "benchmark_table.md", "benchmark_table.tex", "ranks_bootstrap.csv"):
        assert (out / name).stat().st_size > 100
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert pngs == sorted(
        [f"{kind}_{metric}.png" for kind in ("heatmap", "rank_stability") for metric in ("DSC", "AUROC")]
        + ["bars_DSC_d_1.png", "bars_AUROC_c_1.png"]
    )
    for name in pngs:
        path = out / "plots" / name
        width, height = _png_size(path)
        assert width >= 400 and height >= 300 and path.stat().st_size > 15_000, name
    table = pd.read_csv(out / "benchmark_table.csv")
    assert list(table.columns[:5]) == ["method", "architecture", "schedule", "external", "metric"]
    assert not table.external.any()  # no external checkpoint: the column is there, all false
    assert "External checkpoints" not in (out / "benchmark_table.md").read_text()
    assert r"\dagger" not in (out / "benchmark_table.tex").read_text()
    assert list(table.columns[-8:]) == ["mean", "mean_id", "mean_ood", "avg_rank", "delta_scratch", "delta_scratch_ci_low",
                                        "delta_scratch_ci_high", "trained_share"]


# ------------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "body, header, message",
    [
        ("A,cnn,ft,d_1,DSC,0.5,,\nA,cnn,ft,d_2,DSC,abc,,\n", HEADER, r"line 3, column 'value': 'abc' is not"),
        ("A,cnn,ft,d_1,Dice,0.5,,\n", HEADER, r"line 2, column 'metric': unknown metric 'Dice'"),
        ("A,cnn,ft,d_1,DSC,,,\n", HEADER, r"line 2, column 'value'"),
        ("A,cnn,ft,d_1,DSC,85.1,,\n", HEADER, r"line 2, column 'value': 85.1 is outside \[0, 1\]"),
        ("A,cnn,,d_1,DSC,0.5,,\n", HEADER, r"line 2, column 'schedule': empty value"),
        (
            "A,cnn,ft,d_1,0.5\n",
            "method,architecture,schedule,dataset,value\n",
            r"line 1: missing required column\(s\) \['metric'\]",
        ),
        ("A,cnn,ft,d_1,DSC,0.5,0,x\nA,cnn,ft,d_1,DSC,0.6,0,x\n", HEADER, r"line 3, column 'case': duplicate of line 2"),
        ("A,cnn,ft,d_1,DSC,0.5,0,x\nA,cnn,ft,d_1,DSC,0.6,0,\n", HEADER, r"line 3, column 'case': summary row"),
        ("A,cnn,ft,d_1,DSC,0.5,,\n\nA,cnn,ft,d_2,DSC,0.5,,\n", HEADER, r"line 3, column 'method': blank line"),
    ],
)
def test_malformed_results_name_line_and_column(tmp_path, body, header, message):
    with pytest.raises(ResultsFormatError, match=message):
        read_results(write(tmp_path, body, header=header))


def test_cli_reports_malformed_input_and_fails(tmp_path, capsys):
    results = write(tmp_path, "A,cnn,ft,d_1,DSC,oops,,\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["aggregate", "--results", str(results), "--out", str(tmp_path / "o")])
    assert args.func(args) == 2
    assert "line 2, column 'value'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "benchmark_table.csv").exists()


# ---------------------------------------------------------------------------------- collect


def _metrics_json(root, dataset, run, fold, **doc):
    path = root / dataset / run / f"fold_{fold}" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": dataset, "run": run, "fold": fold, **doc}))
    return path


def test_collect_round_trip(tmp_path):
    root = tmp_path / "results" / "downstream"
    mae = dict(method="mae", architecture="resenc_l", schedule="sawtooth", selection="om", epochs=150)
    scratch = dict(method="scratch", architecture="resenc_l", epochs=150)  # no schedule: "none"
    _metrics_json(root, "seg_a", "mae__resenc_l__om__sawtooth__150", 0, **mae,
                  cases=[{"case": "s1", "DSC": 0.5, "NSD": 0.6, "DSC_per_class": [0.5]},
                         {"case": "s2", "DSC": 0.7, "NSD": None}],
                  summary={"DSC": 0.99, "NSD": 0.6})  # summary ignored when cases exist
    _metrics_json(root, "seg_a", "mae__resenc_l__om__sawtooth__150", 1, **mae, cases=[{"case": "s3", "DSC": 0.9}])
    _metrics_json(root, "seg_a", "scratch__resenc_l__150", 0, **scratch, cases=[{"case": "s1", "DSC": 0.4}])
    _metrics_json(root, "cls_b", "scratch__resenc_l__150", 0, **scratch,
                  summary={"balanced_accuracy": 0.55, "AUROC": 0.61, "loss": 3.2})
    files = find_metrics_files(root)
    assert len(files) == 4
    out = tmp_path / "long.csv"
    write_results(files, out)
    values = dataset_values(read_results(out))
    assert values[("mae", "resenc_l", "sawtooth", "DSC", "seg_a")] == pytest.approx((0.6 + 0.9) / 2)
    assert values[("mae", "resenc_l", "sawtooth", "NSD", "seg_a")] == pytest.approx(0.6)  # null skipped
    assert values[("scratch", "resenc_l", "none", "AUROC", "cls_b")] == pytest.approx(0.61)
    long = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert set(long[long.metric == "AUROC"].case) == {""}
    assert set(long.metric) == {"DSC", "NSD", "balanced_accuracy", "AUROC"}


def test_collect_folds_varying_epochs_and_selection_into_labels(tmp_path):
    root = tmp_path / "d"
    for epochs in (150, 1000):
        _metrics_json(root, "seg_a", f"scratch__cnn__{epochs}", 0, method="scratch", architecture="cnn",
                      epochs=epochs, cases=[{"case": "x", "DSC": 0.5}])
    for selection in ("all", "t1"):
        _metrics_json(root, "seg_a", f"mae__cnn__{selection}__ft__150", 0, method="mae", architecture="cnn",
                      schedule="ft", selection=selection, epochs=150, cases=[{"case": "x", "DSC": 0.6}])
    long = collect(find_metrics_files(root))
    runs = set(zip(long.method, long.architecture, long.schedule))
    assert runs == {("scratch", "cnn (150 ep)", "none"), ("scratch", "cnn (1000 ep)", "none"),
                    ("mae [all]", "cnn (150 ep)", "ft"), ("mae [t1]", "cnn (150 ep)", "ft")}


def test_collect_errors_name_the_file(tmp_path):
    root = tmp_path / "d"
    bad = _metrics_json(root, "seg_a", "r", 0, method="mae", architecture="cnn", cases=[{"case": "x", "DSC": 0.5}])
    with pytest.raises(CollectError, match=re.escape(str(bad)) + ".*schedule"):
        collect([bad])
    out_of_range = _metrics_json(root, "seg_b", "r", 0, method="mae", architecture="cnn", schedule="ft",
                                 cases=[{"case": "x", "DSC": 81.0}])
    with pytest.raises(CollectError, match=r"cases\[0\]\.DSC = 81.0 is outside"):
        collect([out_of_range])
    one = _metrics_json(root, "seg_c", "r1", 0, method="mae", architecture="cnn", schedule="ft",
                        cases=[{"case": "x", "DSC": 0.5}])
    two = _metrics_json(root, "seg_c", "r2", 0, method="mae", architecture="cnn", schedule="ft",
                        cases=[{"case": "x", "DSC": 0.5}])
    with pytest.raises(CollectError, match="both hold"):
        collect([one, two])
    with pytest.raises(CollectError, match="no metrics.json"):
        collect([])


SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
PROVENANCE = {"name": "mine", "source": "hf://AnonRes/ResEncL-OpenMind-MAE", "kind": "hf", "revision": "v1",
              "commit": "0123456789abcdef0123456789abcdef01234567", "sha256": SHA, "format": "published repository",
              "architecture": {"class": "ResidualEncoderUNet", "family": "cnn", "preset": "ResEncL"},
              "check": {"moved": 310, "left_new": 48, "unexpected": 0, "finetune_patch_size": [160, 160, 160],
                        "position_embedding": None}}


def _external_run(root, dataset, fold, value, provenance=PROVENANCE, suffix="", **fields):
    name = provenance["name"] if isinstance(provenance, dict) and "name" in provenance else "mine"
    doc = dict(method=name, architecture="ResEncL", schedule="ft", epochs=150, external_checkpoint=provenance)
    return _metrics_json(root, dataset, f"{name}__ResEncL__external__ft__150{suffix}", fold,
                         **{**doc, **fields}, cases=[{"case": "x", "DSC": value}])


def test_collect_keeps_low_data_runs_apart_and_compares_them_at_equal_n(tmp_path):
    root = tmp_path / "d"
    for n, shift in ((None, 0.0), (20, -0.3)):
        suffix, extra = (f"__n{n}", {"low_data_n": n}) if n else ("", {})
        _metrics_json(root, "seg_a", f"scratch__cnn__150{suffix}", 0, method="scratch", architecture="cnn",
                      epochs=150, **extra, cases=[{"case": "x", "DSC": 0.6 + shift}])
        _metrics_json(root, "seg_a", f"mae__cnn__om__ft__150{suffix}", 0, method="mae", architecture="cnn",
                      schedule="ft", selection="om", epochs=150, **extra, cases=[{"case": "x", "DSC": 0.7 + shift}])
    # A low-data file written before `low_data_n` existed: N from the run name.
    _metrics_json(root, "seg_b", "mae__cnn__om__ft__150__n20", 0, method="mae", architecture="cnn",
                  schedule="ft", selection="om", epochs=150, cases=[{"case": "x", "DSC": 0.6}])
    collected = gather(find_metrics_files(root))
    runs = set(zip(collected.long.method, collected.long.architecture, collected.long.schedule))
    assert runs == {("scratch", "cnn", "none"), ("mae", "cnn", "ft"),
                    ("scratch", "cnn (n=20)", "none"), ("mae", "cnn (n=20)", "ft")}
    assert set(collected.long[collected.long.dataset == "seg_b"].architecture) == {"cnn (n=20)"}
    low = collected.runs[collected.runs.architecture == "cnn (n=20)"]
    assert set(low.low_data_n) == {20} and set(low.base_architecture) == {"cnn"}
    table = build_table(collected.long, {})
    assert row(table, "mae", architecture="cnn").delta_scratch == pytest.approx(0.1)
    # (0.4 + 0.6) / 2 against scratch at n=20 (0.3), not the full scratch run (0.6)
    assert row(table, "mae", architecture="cnn (n=20)").delta_scratch == pytest.approx(0.2)
    # With several epoch counts the budget reads "(epochs, n)".
    _metrics_json(root, "seg_a", "scratch__cnn__1000__n20", 0, method="scratch", architecture="cnn", epochs=1000,
                  low_data_n=20, cases=[{"case": "x", "DSC": 0.5}])
    assert "cnn (1000 ep, n=20)" in set(collect(find_metrics_files(root)).architecture)


@pytest.mark.parametrize("value, run, message", [
    ("20", None, "'low_data_n' must be a positive integer, got '20'"),
    (0, None, "'low_data_n' must be a positive integer, got 0"),
    (True, None, "'low_data_n' must be a positive integer, got True"),
    (10, "scratch__cnn__150__n20", "'low_data_n' is 10 but the run name 'scratch__cnn__150__n20' says n=20"),
])
def test_collect_rejects_bad_low_data_n(tmp_path, value, run, message):
    path = _metrics_json(tmp_path, "seg_a", run or "r", 0, method="scratch", architecture="cnn", low_data_n=value,
                         cases=[{"case": "x", "DSC": 0.5}])
    with pytest.raises(CollectError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        collect([path])


def test_collect_exposes_external_checkpoints_untagged(tmp_path):
    root = tmp_path / "d"
    for selection in ("all", "t1"):  # several selections: our runs are tagged, the external one is not
        _metrics_json(root, "seg_a", f"mae__ResEncL__{selection}__ft__150", 0, method="mae", architecture="ResEncL",
                      schedule="ft", selection=selection, epochs=150, cases=[{"case": "x", "DSC": 0.6}])
    for fold in (0, 1):
        _external_run(root, "seg_a", fold, 0.7)
    paths = find_metrics_files(root)
    collected = gather(paths)
    assert set(collected.long.method) == {"mae [all]", "mae [t1]", "mine"}
    assert external_checkpoints(paths) == collected.external == {
        "mine": {k: PROVENANCE[k] for k in ("name", "source", "kind", "revision", "commit", "sha256", "format",
                                            "architecture")}}
    assert collected.runs.set_index("method").external.to_dict() == {"mae [all]": False, "mae [t1]": False,
                                                                     "mine": True}


def test_collect_refuses_two_checkpoints_under_one_name(tmp_path):
    root = tmp_path / "d"
    first = _external_run(root, "seg_a", 0, 0.7)
    second = _external_run(root, "seg_b", 0, 0.7, provenance={**PROVENANCE, "sha256": "0" * 64})
    with pytest.raises(CollectError, match=re.escape(f"{first} and {second}") + ".*differ in sha256"):
        collect([first, second])
    own = _metrics_json(root, "seg_c", "mine__ResEncL__om__ft__150", 0, method="mine", architecture="ResEncL",
                        schedule="ft", selection="om", epochs=150, cases=[{"case": "x", "DSC": 0.5}])
    with pytest.raises(CollectError, match=re.escape(f"{first} holds a run of external checkpoint 'mine' but {own}")):
        collect([first, own])


@pytest.mark.parametrize("provenance, message", [
    ("hf://AnonRes/ResEncL-OpenMind-MAE", "must be an object with at least 'name' and 'source'"),
    ({"name": "mine"}, "'source' is missing or not a non-empty string"),
    ({"name": "mine", "source": "  "}, "'source' is missing or not a non-empty string"),
    ({"source": "/ckpt.pth"}, "'name' is missing or not a non-empty string"),
    ({"name": "other", "source": "/ckpt.pth"}, "name 'other' is not the method 'mine'"),
    ({**PROVENANCE, "sha256": "ABC"}, "'sha256' 'ABC' is not 64 lower-case hexadecimal digits"),
    ({**PROVENANCE, "kind": "s3"}, "'kind' is 's3', expected one of"),
    ({**PROVENANCE, "revision": 3}, "'revision' must be a string or null, got 3"),
    ({**PROVENANCE, "architecture": "ResEncL"}, "'architecture' must be an object or null"),
    ({**PROVENANCE, "check": [1, 2]}, "'check' must be an object or null"),
])
def test_collect_rejects_malformed_external_checkpoint(tmp_path, provenance, message):
    path = _metrics_json(tmp_path, "seg_a", "r", 0, method="mine", architecture="ResEncL", schedule="ft",
                         external_checkpoint=provenance, cases=[{"case": "x", "DSC": 0.5}])
    where = re.escape(f"{path}: field 'external_checkpoint'")
    with pytest.raises(CollectError, match=where + ".*" + re.escape(message)):
        collect([path])


def test_collect_rejects_an_external_checkpoint_named_scratch(tmp_path):
    path = _metrics_json(tmp_path, "seg_a", "r", 0, method="scratch", architecture="ResEncL",
                         external_checkpoint={**PROVENANCE, "name": "scratch"}, cases=[{"case": "x", "DSC": 0.5}])
    with pytest.raises(CollectError, match=re.escape(str(path)) + ".*cannot be named 'scratch'"):
        collect([path])


def _external_table(tmp_path):
    root = tmp_path / "d"
    _metrics_json(root, "seg_a", "scratch__ResEncL__150", 0, method="scratch", architecture="ResEncL", epochs=150,
                  cases=[{"case": "x", "DSC": 0.6}])
    _metrics_json(root, "seg_a", "mae__ResEncL__om__ft__150", 0, method="mae", architecture="ResEncL",
                  schedule="ft", selection="om", epochs=150, cases=[{"case": "x", "DSC": 0.65}])
    _external_run(root, "seg_a", 0, 0.7, provenance={**PROVENANCE, "source": "/data/ssl/a_b|c.pth"})
    return root


def test_tables_mark_external_rows_and_list_their_sources(tmp_path):
    collected = gather(find_metrics_files(_external_table(tmp_path)))
    table = build_table(collected.long, {}, collected.external)
    assert table.set_index("method").external.to_dict() == {"mae": False, "mine": True, "scratch": False}
    md = render_markdown(table, collected.external)
    rows = {r[0]: r for r in _md_block(md, "Dice")[1:]}
    assert set(rows) == {"scratch", "mae", "mine†"}
    note = md.split("## External checkpoints")[1]
    assert ("- mine: source `/data/ssl/a_b|c.pth`; revision `v1`; commit `0123456789abcdef0123456789abcdef01234567`;"
            " sha256 `9f86d081884c`; format: published repository") in note
    tex = render_latex(table, collected.external)
    assert _unescaped(tex, "{") == _unescaped(tex, "}")
    assert r"mine$^\dagger$ &" in tex and r"mae &" in tex
    assert r"\textbf{mine}: source \texttt{/data/ssl/a\_b|c.pth}, revision \texttt{v1}" in tex
    assert r"sha256 \texttt{9f86d081884c}, format published repository}" in tex
    assert tex.index(r"\end{tabular}") < tex.index(r"\textbf{mine}") < tex.index(r"\end{table}")
    # Without external checkpoints nothing is marked and there is no note.
    plain = render_markdown(build_table(collected.long, {}), {})
    assert "†" not in plain and "External checkpoints" not in plain


def test_cli_keeps_the_external_marks_through_the_long_csv(tmp_path):
    root = _external_table(tmp_path)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "bench"
    args = parser.parse_args(["benchmark-table", "--root", str(root), "--out", str(out), "--bootstrap", "5",
                              "--registry", str(tmp_path / "absent.yaml")])
    assert args.func(args) == 0
    assert "- mine: source `/data/ssl/a_b|c.pth`" in (out / "benchmark_table.md").read_text()
    assert pd.read_csv(out / "benchmark_table.csv").set_index("method").external.to_dict()["mine"]
    # The same through collect-results + aggregate, provenance carried by --external-out.
    args = parser.parse_args(["collect-results", "--root", str(root), "--out", str(tmp_path / "long.csv"),
                              "--external-out", str(tmp_path / "external.json")])
    assert args.func(args) == 0
    args = parser.parse_args(["aggregate", "--results", str(tmp_path / "long.csv"), "--out", str(tmp_path / "agg"),
                              "--bootstrap", "5", "--external-checkpoints", str(tmp_path / "external.json"),
                              "--registry", str(tmp_path / "absent.yaml")])
    assert args.func(args) == 0
    assert (tmp_path / "agg" / "benchmark_table.md").read_text() == (out / "benchmark_table.md").read_text()


def test_external_checkpoints_file_is_checked(tmp_path, capsys):
    bad = tmp_path / "external.json"
    bad.write_text(json.dumps({"mine": {"name": "mine", "source": "/x.pth", "sha256": "nope"}}))
    with pytest.raises(CollectError, match=re.escape(f"{bad}: entry 'mine'") + ".*'sha256' 'nope'"):
        read_external_checkpoints(bad)
    bad.write_text("[1]")
    with pytest.raises(CollectError, match="top level must be an object"):
        read_external_checkpoints(bad)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    results = write(tmp_path, TIES)
    args = parser.parse_args(["aggregate", "--results", str(results), "--out", str(tmp_path / "o"),
                              "--external-checkpoints", str(tmp_path / "absent.json")])
    assert args.func(args) == 2
    assert "absent.json: cannot read the external checkpoints file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ figures


def _texts_outside_canvas(fig) -> list[str]:
    """Every visible text of the drawn `fig` that reaches past the canvas (what a reader sees clipped)."""
    from matplotlib.text import Text

    fig.canvas.draw()  # lay out again at the figure's dpi (the saved file's), then measure
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    outside = []
    for text in fig.findobj(Text):
        if not text.get_visible() or not text.get_text().strip():
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < canvas.x0 - 0.5 or box.y0 < canvas.y0 - 0.5 or box.x1 > canvas.x1 + 0.5 or box.y1 > canvas.y1 + 0.5:
            extents = [round(v) for v in box.extents]
            outside.append(f"{text.get_text()!r} at {extents} on {[round(v) for v in canvas.extents]}")
    return outside


def _figure_results(runs: list[tuple[str, str, str]], datasets: list[str], cases: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [(m, a, s, d, "DSC", rng.uniform(0.3, 0.9), "test", f"case_{c}" if cases else "")
            for m, a, s in runs for d in datasets for c in range(max(cases, 1))]
    return pd.DataFrame(rows, columns=HEADER.strip().split(","))


FIGURE_SHAPES = {
    "one run, one dataset, no per-case values": ([("scratch", "ResEncTiny", "none")], ["DemoPatientCls"], 0),
    "the demo": ([("scratch", "ResEncTiny", "none"), ("simclr", "ResEncTiny", "default"),
                  ("simclr", "ResEncTiny", "frozen")], ["DemoLesionT1", "DemoLesionT1FLAIR"], 3),
    "many long runs and datasets": ([(f"models_genesis_anat_anon{i}", "PrimusM", "sawtooth") for i in range(11)]
                                    + [("scratch", "ResEncL", "none")], [f"Dataset{i}_LongName" for i in range(8)], 2),
}


@pytest.mark.parametrize("shape", FIGURE_SHAPES)
def test_every_figure_keeps_its_texts_inside_the_canvas(tmp_path, shape):
    from openmind_bench.aggregate import plots

    runs, datasets, cases = FIGURE_SHAPES[shape]
    results = tmp_path / "results.csv"
    _figure_results(runs, datasets, cases).to_csv(results, index=False)
    frame = read_results(results)
    table = build_table(frame, {})
    boot = bootstrap(frame, 20, 0, dataset_order=datasets)
    import matplotlib

    # a process-wide style set before (nnU-Net's progress plot: seaborn.set(font_scale=2.5)) changes nothing
    with matplotlib.rc_context({"font.size": 25.0, "axes.labelsize": "large"}):
        figures = {
            "heatmap": plots.heatmap(table, "DSC", tmp_path / "heatmap.png"),
            "rank_stability": plots.rank_stability(boot.ranks, "DSC", tmp_path / "rank.png"),
            **{f"bars {d}": plots.dataset_bars(boot.intervals, table, "DSC", d, tmp_path / f"bars_{d}.png", 20)
               for d in datasets[:2]},
        }
    clipped = {name: outside for name, fig in figures.items() if (outside := _texts_outside_canvas(fig))}
    assert not clipped, clipped


def test_leakage_footnote_counts_excluded_images_per_downstream_set(tmp_path):
    from openmind_bench.aggregate import run
    from openmind_bench.aggregate.table import leakage_note

    leakage = tmp_path / "leakage.tsv"
    leakage.write_text("image_id\tdataset\tsubject\tsession\tmodality\tdownstream_dataset\tcase\tchannel\tdistance\n"
                       "ds1__a\tds1\t1\t\tT1w\td_1\tc1\t0\t0.01\nds1__b\tds1\t2\t\tT1w\td_1\tc1\t0\t0.02\n"
                       "ds1__a\tds1\t1\t\tT1w\td_1\tc2\t0\t0.03\nds2__c\tds2\t1\t\tFLAIR\td_2\tc7\t1\t0.0\n")
    out = tmp_path / "bench"
    run(write(tmp_path, TIES), out, registry=None, bootstrap_samples=10, seed=0, leakage=leakage)
    md = (out / "benchmark_table.md").read_text()
    assert md.rstrip().endswith("images excluded per downstream set: d_1: 2, d_2: 1.")
    assert "images excluded per downstream set: d\\_1: 2, d\\_2: 1." in (out / "benchmark_table.tex").read_text()
    # checked, nothing found; not checked (no leakage.tsv): no footnote
    assert leakage_note({}).endswith("none was found.")
    run(write(tmp_path, TIES), out, registry=None, bootstrap_samples=10, seed=0, leakage=tmp_path / "absent.tsv")
    assert "Leakage" not in (out / "benchmark_table.md").read_text()
