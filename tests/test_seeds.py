"""Runs repeated over seeds (config `finetune.seeds`, issue 21's config/small.yaml): their names and
settings, each seed's own low-data cases, their fold labels in the long table, and the bootstrap that
resamples seeds as well as cases, with hand-computed intervals of the delta to scratch."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from openmind_bench import config as omb_config
from openmind_bench.aggregate import run as aggregate_run
from openmind_bench.aggregate.bootstrap import bootstrap, draw_cases
from openmind_bench.aggregate.collect import CollectError, collect, find_metrics_files
from openmind_bench.aggregate.results import base_fold, fold_label, validate
from openmind_bench.config import ConfigError
from openmind_bench.demo.downstream import COHORTS, SEG_T1, _cohort
from openmind_bench.downstream import settings as ft_settings
from openmind_bench.downstream.splits import SplitError, SplitSettings, ensure_low_data_subset, make_split
from openmind_bench.metrics.report import RunIdentity
from openmind_bench.names import InvalidName, parse_run
from conftest import REPO


def _config(**overrides) -> dict:
    return omb_config.deep_update(omb_config.load(REPO / "config" / "demo.yaml"), overrides)


@pytest.mark.parametrize("run, seed, low", [
    ("mae__ResEncTiny__demo__default__6__n3__s2", 2, 3),
    ("scratch__ResEncTiny__6__s0", 0, None),
    ("mine__frozen__50__n10__s11", 11, 10),
    ("mae__ResEncTiny__demo__default__6", None, None),
])
def test_seed_names_parse_and_print_back(run, seed, low):
    name = parse_run(run)
    assert (name.seed, name.low_data_n) == (seed, low) and str(name) == run


def test_a_seed_comes_after_the_low_data_size():
    with pytest.raises(InvalidName):
        parse_run("scratch__ResEncTiny__6__s1__n3")


def test_seeds_repeat_every_run_and_low_data_only_drops_the_full_runs():
    config = _config(downstream={"low_data_n": [3], "low_data_only": True, "schedules": ["default"],
                                 "lora": {"pretrained_runs": None}},
                     finetune={"seeds": [0, 1, 2], "pretrained_runs": ["mae__PrimusTiny__demo"],
                               "scratch_architectures": ["ResEncTiny"]}, checkpoints=[])
    runs = ft_settings.run_names(config, ["mae__PrimusTiny__demo"])
    assert runs == [f"mae__PrimusTiny__demo__default__6__n3__s{s}" for s in range(3)] + \
        [f"scratch__ResEncTiny__6__n3__s{s}" for s in range(3)]
    config["finetune"]["seeds"] = []
    assert ft_settings.run_names(config, ["mae__PrimusTiny__demo"]) == [
        "mae__PrimusTiny__demo__default__6__n3", "scratch__ResEncTiny__6__n3"]
    config["downstream"]["low_data_n"] = []
    with pytest.raises(ConfigError, match="'downstream.low_data_only' is true but 'downstream.low_data_n' is empty"):
        ft_settings.run_names(config, ["mae__PrimusTiny__demo"])


def test_repeated_seeds_are_a_config_error():
    with pytest.raises(ConfigError, match="finetune.seeds"):
        _config_validated({"finetune": {"seeds": [1, 1]}})


def _config_validated(overrides: dict) -> dict:
    return omb_config.validate(overrides, omb_config.SCHEMA_PATH)


def test_a_seeded_run_takes_its_seed_and_its_own_low_data_subset():
    config = _config(downstream={"low_data_n": [3]}, finetune={"seed": 7}, checkpoints=[])
    plain = ft_settings.resolve(config, "DemoLesionT1", "scratch__ResEncTiny__6__n3", "test", split="s.json")
    assert plain.seed == 7
    seeded = ft_settings.resolve(config, "DemoLesionT1", "scratch__ResEncTiny__6__n3__s2", "test", split="s.json")
    assert seeded.seed == 2
    folder = config["downstream"]["splits_dir"]
    assert ft_settings.split_path(config, "DemoLesionT1", 3) == f"{folder}/DemoLesionT1__n3.json"
    assert ft_settings.split_path(config, "DemoLesionT1", 3, 2) == f"{folder}/DemoLesionT1__n3__s2.json"
    assert ft_settings.split_path(config, "DemoLesionT1", None, 2) == f"{folder}/DemoLesionT1.json"


def test_each_seed_draws_its_cases_and_a_subset_of_another_seed_is_refused(tmp_path):
    cases = pd.DataFrame({"case": [f"c{i:02d}" for i in range(24)], "subject": [f"s{i:02d}" for i in range(24)]})
    split = make_split(cases, "X", "test", SplitSettings(folds=0))
    draws = {seed: ensure_low_data_subset(tmp_path / f"X__n3__s{seed}.json", cases, split, 3, seed)["train"]
             for seed in range(3)}
    assert all(len(d) == 3 for d in draws.values()) and len({tuple(d) for d in draws.values()}) > 1
    with pytest.raises(SplitError, match=r"X__n3__s0.json was drawn with seed 0, this run's seed is 1"):
        ensure_low_data_subset(tmp_path / "X__n3__s0.json", cases, split, 3, 1)


def test_the_seed_is_part_of_the_run_identity():
    assert RunIdentity("d", "scratch", "cnn", "test", seed=2).seed == 2
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        RunIdentity("d", "scratch", "cnn", "test", seed=-1)


# ------------------------------------------------------------------------------ aggregation


def _metrics(root, run: str, seed: int | None, dsc: dict[str, float], *, fold="test", write_seed=True):
    name = parse_run(run)
    doc = {"dataset": "seg", "run": run, "fold": fold, "method": name.method, "architecture": "cnn",
           "epochs": name.epochs, "low_data_n": name.low_data_n,
           "cases": [{"case": c, "DSC": v} for c, v in dsc.items()]}
    if name.pretrained:
        doc.update(schedule=name.schedule, selection=name.selection)
    if write_seed and seed is not None:
        doc["seed"] = seed
    path = root / "seg" / run / f"fold_{fold}" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


CASES = [f"x{i}" for i in range(8)]


def _seeded_results(root, gains: dict[int, float]):
    """Scratch at 0.4 + 0.05 * case index; MAE the same plus its seed's gain, on every case."""
    for seed, gain in gains.items():
        base = {c: 0.4 + 0.05 * i for i, c in enumerate(CASES)}
        _metrics(root, f"scratch__cnn__6__n3__s{seed}", seed, base)
        _metrics(root, f"mae__cnn__om__default__6__n3__s{seed}", seed, {c: v + gain for c, v in base.items()})


def test_seeds_share_one_row_and_are_averaged_like_folds(tmp_path):
    _seeded_results(tmp_path, {0: 0.2, 1: 0.0})
    long = collect(find_metrics_files(tmp_path))
    assert set(long.fold) == {"test/s0", "test/s1"} and set(long.architecture) == {"cnn (n=3)"}
    assert base_fold("test/s1") == "test" and fold_label("test", None) == "test" and fold_label(0, 3) == "0/s3"


def test_a_seed_field_that_contradicts_the_run_name_is_refused(tmp_path):
    path = _metrics(tmp_path, "scratch__cnn__6__s1", 2, {"a": 0.5})
    with pytest.raises(CollectError, match=r"field 'seed' is 2 but the run name 'scratch__cnn__6__s1' says s1"):
        collect([path])
    old = _metrics(tmp_path / "old", "scratch__cnn__6__s1", 1, {"a": 0.5}, write_seed=False)
    assert set(collect([old]).fold) == {"test/s1"}  # a file without the field: the seed from its name


def _frame(tmp_path) -> pd.DataFrame:
    long = collect(find_metrics_files(tmp_path))
    return validate(long.astype(str))


def test_a_constant_gain_has_a_zero_width_interval(tmp_path):
    _seeded_results(tmp_path, {0: 0.1, 1: 0.1, 2: 0.1})
    deltas = bootstrap(_frame(tmp_path), 400, 0).deltas
    mae = deltas[deltas.method == "mae"].iloc[0]
    assert mae.reference == "scratch / cnn (n=3) / none" and mae.seeds == 3
    assert mae.delta == pytest.approx(0.1) and mae.ci_low == pytest.approx(0.1) and mae.ci_high == pytest.approx(0.1)


def test_the_interval_holds_the_spread_over_seeds(tmp_path):
    # seed 0 gains 0.2 on every case, seed 1 nothing: observed 0.1; a sample that draws seed 0 twice
    # gives 0.2, seed 1 twice 0 (a quarter of the samples each), so the 95% interval is [0, 0.2].
    # Resampling the cases alone would give [0.1, 0.1]: the cases are paired across runs and seeds.
    _seeded_results(tmp_path, {0: 0.2, 1: 0.0})
    frame = _frame(tmp_path)
    deltas = bootstrap(frame, 2000, 0).deltas
    mae = deltas[deltas.method == "mae"].iloc[0]
    assert mae.delta == pytest.approx(0.1) and mae.seeds == 2
    assert mae.ci_low == pytest.approx(0.0) and mae.ci_high == pytest.approx(0.2)
    draws = draw_cases(frame, 50, 0)
    assert draws.counts[("seg", "test/s0")][1] is draws.counts[("seg", "test/s1")][1]  # one draw of cases
    weights = np.stack([draws.seed_weights[("seg", f"test/s{s}")] for s in range(2)], axis=1)
    assert (weights.sum(axis=1) == 2).all() and (weights == 2).any() and (weights == 1).any()


def test_without_seeds_the_draws_are_the_ones_of_before(tmp_path):
    # rows without seed labels keep one draw per fold, from the same per-dataset stream
    rows = [("A", "cnn", "ft", "d", "DSC", str(0.1 * i), str(fold), f"c{i}") for fold in (0, 1) for i in range(5)]
    frame = validate(pd.DataFrame(rows, columns=["method", "architecture", "schedule", "dataset", "metric", "value",
                                                 "fold", "case"]))
    draws = draw_cases(frame, 20, 3)
    rng = np.random.default_rng([3, __import__("zlib").crc32(b"d")])
    for fold in ("0", "1"):
        picks = rng.integers(0, 5, size=(20, 5))
        expected = np.stack([np.bincount(p, minlength=5) for p in picks])
        assert (draws.counts[("d", fold)][1] == expected).all()
    assert draws.seed_weights == {}


def test_the_table_shows_the_interval_beside_delta_scratch(tmp_path):
    _seeded_results(tmp_path / "d", {0: 0.2, 1: 0.0})
    long = collect(find_metrics_files(tmp_path / "d"))
    results = tmp_path / "results_long.csv"
    long.to_csv(results, index=False)
    out = aggregate_run(results, tmp_path / "out", registry=None, bootstrap_samples=500, seed=0)
    md = out.table_md.read_text(encoding="utf-8")
    assert "| **+10.00 [+0.00, +20.00]** |" in md  # the best delta in bold, interval and all
    table = pd.read_csv(out.table_csv)
    mae = table[table.method == "mae"].iloc[0]
    assert (mae.delta_scratch_ci_low, mae.delta_scratch_ci_high) == pytest.approx((0.0, 0.2))
    assert pd.read_csv(out.deltas).shape[0] == 1


def test_the_demo_cohort_repeats_with_new_subjects():
    one = _cohort(SEG_T1, 1)
    assert one == COHORTS[SEG_T1]
    three = _cohort(SEG_T1, 3)
    assert len(three) == 3 * len(one) and len({s[0] for s in three}) == len(three)
    assert [s[1:] for s in three[len(one):2 * len(one)]] == [s[1:] for s in one]  # same sites, patients, sessions
    with pytest.raises(ValueError, match="at least 1"):
        _cohort(SEG_T1, 0)


def test_the_small_config_validates_and_asks_for_seeded_low_data_runs():
    config = omb_config.load(REPO / "config" / "small.yaml")
    runs = ft_settings.run_names(config, ["mae__ResEncTiny__demo"])
    assert sorted(runs) == sorted([f"mae__ResEncTiny__demo__default__6__n3__s{s}" for s in range(3)]
                                  + [f"scratch__ResEncTiny__6__n3__s{s}" for s in range(3)])
