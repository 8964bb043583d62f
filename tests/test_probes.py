"""Linear and k-NN probes: known answers on hand-built features, probe runs of the fine-tuning stage
(metrics in the aggregation shape, cached features, classification datasets only), the probe
settings' errors, and probes during pre-training: bit-identical weights with and without them, and a
failing probe skipped while pre-training goes on."""

import csv
import functools
import json
import logging
import random
import shutil
import types

import numpy as np
import pytest
import torch
import yaml

from openmind_bench import config as omb_config
from openmind_bench.aggregate import probe_histories
from openmind_bench.aggregate.collect import read_metrics_json
from openmind_bench.config import ConfigError
from openmind_bench.downstream import probes, settings as run_settings, splits, worker
from openmind_bench.downstream.readers import case_table, read_dataset
from openmind_bench.names import probe_column
from openmind_bench.pretrain import monitor, trainer
from openmind_bench.registry import load_registry

from test_trainer import final_weights, progress_rows, small_settings
from test_transfer import pretrained_checkpoint

REGISTRY = "config/downstream_demo.yaml"
CLS = "DemoPatientCls"
SETTINGS = omb_config.defaults()["downstream"]["probes"]
FAST = {**SETTINGS, "logistic_cs": 3, "cv_folds": 3}  # a smaller search where the grid is not under test

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n_per_class: int, seed: int, n_classes: int = 2, width: int = 8):
    """Classes as well-separated clusters along the first axes, the other axes noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    features = rng.normal(0, 0.3, (len(labels), width))
    features[np.arange(len(labels)), labels] += 4.0
    return features, labels


def test_probes_on_separable_features_score_perfectly():
    train_x, train_y = _blobs(10, 0, n_classes=3)
    test_x, test_y = _blobs(5, 1, n_classes=3)
    chosen = {}
    for kind in probes.PROBES:
        p, chosen[kind] = probes.fit_and_predict(kind, train_x, train_y, test_x, 3, SETTINGS, seed=0)
        assert p.shape == (15, 3) and np.allclose(p.sum(axis=1), 1.0)
        assert (p.argmax(axis=1) == test_y).all(), kind
        assert chosen[kind]["training_cases"] == 30 and chosen[kind]["feature_width"] == 8
    assert chosen[probes.KNN]["k"] == 20
    assert np.isclose(np.logspace(-4, 4, 10), chosen[probes.LINEAR]["C"]).any()  # chosen from the grid
    oof = probes.out_of_fold(probes.LINEAR, train_x, train_y, 3, FAST, seed=0)
    assert (oof.argmax(axis=1) == train_y).all()


def test_knn_with_one_neighbour_returns_the_nearest_training_label():
    train_x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    train_y = np.array([0, 1, 1])
    # cosine distance: the direction decides, not the length
    test_x = np.array([[5.0, 0.4], [0.1, 3.0], [-2.0, -0.1]])
    p, _ = probes.fit_and_predict(probes.KNN, train_x, train_y, test_x, 2, {**SETTINGS, "knn_k": 1}, seed=0)
    assert p.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]


def test_probe_features_without_signal_score_at_chance_and_absent_classes_get_zero():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(120, 4)), rng.integers(0, 2, 120)
    oof = probes.out_of_fold(probes.LINEAR, x, y, 2, FAST, seed=0)
    assert abs(float(((oof.argmax(1) == y).mean())) - 0.5) < 0.15
    # a class the training cases lack gets probability 0 (a low-data subset may miss one)
    train_x, train_y = _blobs(4, 0)
    p, _ = probes.fit_and_predict(probes.LINEAR, train_x, train_y, train_x[:2], 3, FAST, seed=0)
    assert p.shape == (2, 3) and (p[:, 2] == 0).all()
    # one case in a class: no stratified search, C = 1
    assert probes.fit_and_predict(probes.LINEAR, train_x[3:], train_y[3:], train_x[:2], 2, SETTINGS, 0)[1]["C"] == 1.0
    with pytest.raises(ValueError, match="at least two classes"):
        probes.fit_and_predict(probes.KNN, train_x[:4], train_y[:4], train_x, 2, SETTINGS, seed=0)
    with pytest.raises(ValueError, match="two cases of every class"):
        probes.out_of_fold(probes.KNN, train_x[3:], train_y[3:], 2, SETTINGS, seed=0)


def _config(root, **sections):
    cfg = {"downstream_registry": REGISTRY,
           "downstream": {"root": str(root), "epochs": [2], **sections.pop("downstream", {})},
           "finetune": {"scratch_architectures": ["ResEncTiny"], "pretrained_runs": ["mae__ResEncTiny__demo"],
                        "scratch_patch_size": [32, 32, 32], "spacing": [3.5, 3.5, 3.5]}}
    return omb_config.validate(omb_config.deep_update(cfg, sections), omb_config.SCHEMA_PATH)


def test_probe_schedules_are_targets_of_classification_datasets_only(downstream_root):
    config = _config(downstream_root, downstream={"schedules": ["default", "linear_probe", "knn"]})
    targets = run_settings.targets(config, ["mae__ResEncTiny__demo"])
    probe_targets = [t for t in targets if "_probe__" in t or "__knn__" in t]
    assert sorted(probe_targets) == [
        f"results/downstream/{CLS}/mae__ResEncTiny__demo__{s}__2/fold_test/metrics.json"
        for s in ("knn", "linear_probe")]
    assert "results/downstream/DemoLesionT1/mae__ResEncTiny__demo__default__2/fold_test/metrics.json" in targets
    assert not run_settings.runs_on(config, "mae__ResEncTiny__demo__knn__2", "DemoLesionT1")
    with pytest.raises(ConfigError, match="custom_schedules.knn"):
        run_settings.check_schedules(_config(downstream_root, downstream={
            "schedules": ["knn"], "custom_schedules": {"knn": [{"name": "x"}]}}), ["mae__ResEncTiny__demo"])


def test_the_estimate_counts_no_training_for_probe_runs():
    from openmind_bench.estimate import jobs

    from test_estimate import SMALL

    config = omb_config.validate(omb_config.deep_update(json.loads(json.dumps(SMALL)), {
        "downstream": {"schedules": ["default", "linear_probe"]}}), omb_config.SCHEMA_PATH)
    assert {j.run for j in jobs(config) if j.stage != "pretrain"} == {"mae__ResEncTiny__demo__default__3"}


def _split(root, tmp_path, dataset=CLS):
    spec = load_registry(REGISTRY, root).get(dataset)
    path = tmp_path / "splits" / f"{dataset}.json"
    path.parent.mkdir(exist_ok=True)
    splits.ensure_split(path, case_table(read_dataset(spec)), dataset, spec.role)
    return path


def test_probe_runs_score_the_split_with_cached_features(downstream_root, tmp_path, monkeypatch):
    ckpt = tmp_path / "mae__ResEncTiny__demo" / "checkpoint_final.pt"
    ckpt.parent.mkdir()
    pretrained_checkpoint(ckpt, "ResEncTiny")
    config = _config(downstream_root, downstream={"schedules": ["linear_probe", "knn"]})
    split = _split(downstream_root, tmp_path)
    docs = {}
    for schedule in probes.PROBES:
        run = f"mae__ResEncTiny__demo__{schedule}__2"
        out = tmp_path / "results" / "downstream" / CLS / run / "fold_test"
        s = run_settings.resolve(config, CLS, run, "test", out_dir=str(out), split=str(split),
                                 pretrained_checkpoint=str(ckpt))
        assert s.probes == SETTINGS and s.classification is None and s.schedule_config is None
        assert worker.launch(s, threads=1) == 0  # what rule finetune calls: the probe, in this process
        docs[schedule] = json.loads((out / "metrics.json").read_text())
        read_metrics_json(out / "metrics.json")  # the aggregation stage takes it
        assert (out / probes.FEATURES_FILE).exists()
    doc = docs["linear_probe"]
    test_ids = splits.read_split(str(split))["test"]
    assert [c["case"] for c in doc["cases"]] == sorted(test_ids)
    assert (doc["schedule"], doc["method"], doc["architecture"], doc["fold"]) == \
        ("linear_probe", "mae", "ResEncTiny", "test")
    assert doc["training"]["probe"] == "linear_probe" and doc["training"]["feature_width"] > 0
    assert doc["run_record"]["inputs"]["checkpoint"]["sha256"]  # what the probe was made from
    assert docs["knn"]["training"]["k"] == len(splits.read_split(str(split))["train"])  # 20 capped at the cases

    # a rerun reads every feature from the cache: no forward pass
    def no_forward(*args, **kwargs):
        raise AssertionError("features recomputed")

    monkeypatch.setattr(probes, "extract", no_forward)
    assert probes.run(s) == "finished"
    assert json.loads((tmp_path / "results" / "downstream" / CLS / "mae__ResEncTiny__demo__knn__2" / "fold_test" /
                       "metrics.json").read_text())["cases"] == docs["knn"]["cases"]


def test_probe_settings_errors_name_the_key(downstream_root, tmp_path):
    assert probes.training_probe_config(_config(downstream_root)) is None  # probe_every 0: off
    config = _config(downstream_root, pretrain={"probe_every": 2})
    resolved = probes.training_probe_config(config)  # null: the registry's first classification dataset
    assert [d["name"] for d in resolved["datasets"]] == [CLS] and resolved["every"] == 2
    assert resolved["datasets"][0]["split"] == "results/downstream/splits/DemoPatientCls.json"
    elsewhere = _config(tmp_path / "nowhere", pretrain={"probe_every": 1})
    with pytest.raises(ConfigError, match=r"downstream_registry'.*DemoPatientCls' has no folder"):
        probes.training_probe_config(elsewhere)
    with pytest.raises(ConfigError, match=r"pretrain.probe_datasets\[0\]'.*seg dataset"):
        probes.training_probe_config(_config(downstream_root, pretrain={"probe_every": 1,
                                                                         "probe_datasets": ["DemoLesionT1"]}))
    with pytest.raises(ConfigError, match=r"pretrain.probe_datasets\[1\]'.*'Nope'"):
        probes.training_probe_config(_config(downstream_root, pretrain={"probe_every": 1,
                                                                         "probe_datasets": [CLS, "Nope"]}))
    registry = yaml.safe_load(open(REGISTRY))
    registry["datasets"]["OneClass"] = {**registry["datasets"][CLS], "labels": {"patient": 0}}
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(registry))
    one_class = _config(downstream_root, pretrain={"probe_every": 1, "probe_datasets": ["OneClass"]})
    one_class["downstream_registry"] = str(tmp_path / "registry.yaml")
    with pytest.raises(ConfigError, match=r"pretrain.probe_datasets\[0\]'.*two classes"):
        probes.training_probe_config(one_class)


def _probed(tmp_path, name, root, split, probe_every=1, **overrides):
    s = small_settings(tmp_path / name, "mae", "ResEncTiny", epochs=2, steps_per_epoch=2, **overrides)
    s.probe_every = probe_every
    s.probe = {"every": probe_every, "probes": list(probes.PROBES), "registry": REGISTRY, "root": str(root),
               "datasets": [{"name": CLS, "split": str(split)}], "spacing": [3.5, 3.5, 3.5],
               "settings": FAST, "seed": 0}
    return s


def test_probes_during_pretraining_change_nothing_and_a_failing_probe_is_skipped(downstream_root, tmp_path, caplog):
    split = _split(downstream_root, tmp_path)
    plain = small_settings(tmp_path / "plain", "mae", "ResEncTiny", epochs=2, steps_per_epoch=2)
    trainer.run(plain)
    probed = _probed(tmp_path, "probed", downstream_root, split)
    trainer.run(probed)
    reference = final_weights(plain.out_dir)
    weights = final_weights(probed.out_dir)
    assert reference.keys() == weights.keys()
    assert all(torch.equal(reference[k], weights[k]) for k in reference)  # bit-identical
    rows = progress_rows(probed.out_dir)
    column = probe_column(CLS, "linear_probe", "balanced_accuracy")
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(0 <= float(r[column]) <= 1 for r in rows)
    assert {probe_column(CLS, "knn", "AUROC"), "probe_seconds"} <= set(rows[0])
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in progress_rows(plain.out_dir)]
    out = tmp_path / "probed"
    assert (out / monitor.PROBE_CURVE).stat().st_size > 0 and (out / monitor.RECONSTRUCTION).stat().st_size > 0
    assert not (tmp_path / "plain" / monitor.PROBE_CURVE).exists()

    # the probe itself (a network built, the loader's draws) leaves every process-wide generator as it was
    arch = probed.arch()
    method = types.SimpleNamespace(backbone=arch.build([32, 32, 32]))
    probe = monitor.TrainingProbe(probed.probe, functools.partial(arch.build, [32, 32, 32]), [32, 32, 32],
                                 torch.device("cpu"), tmp_path)
    np.random.seed(5)
    torch.manual_seed(5)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    scores, _ = probe(method, 1)
    assert scores[column] >= 0
    assert torch.equal(before[0], torch.get_rng_state()) and (before[1] == np.random.get_state()[1]).all()
    assert before[2] == random.getstate()

    # an unreadable case: the probe is logged and skipped, the run goes on and ends where the others do
    broken_root = tmp_path / "broken"
    shutil.copytree(downstream_root, broken_root)
    spec = load_registry(REGISTRY, broken_root).get(CLS)
    first = next(c for c in read_dataset(spec).cases if c.case_id in splits.read_split(str(split))["train"])
    first.images[0].write_bytes(b"not a nifti")
    broken = _probed(tmp_path, "broken_run", broken_root, split)
    with caplog.at_level(logging.WARNING, logger="openmind_bench.downstream.probes"):
        assert trainer.run(broken).status == "finished"
    assert "probe of DemoPatientCls skipped" in caplog.text
    weights = final_weights(broken.out_dir)
    assert all(torch.equal(reference[k], weights[k]) for k in reference)
    rows = progress_rows(broken.out_dir)
    assert all(not r.get(column) for r in rows) and all(float(r["probe_seconds"]) >= 0 for r in rows)


def test_aggregation_plots_probe_curves_beside_the_fine_tuning_score(tmp_path):
    pretrain = tmp_path / "results" / "pretrain" / "mae__ResEncTiny__demo"
    pretrain.mkdir(parents=True)
    column = probe_column(CLS, "linear_probe", "balanced_accuracy")
    with (pretrain / "progress.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "train_loss", column])
        writer.writeheader()
        writer.writerows([{"epoch": 1, "train_loss": 1.0, column: 0.5}, {"epoch": 2, "train_loss": 0.9, column: 0.75}])
    metrics = tmp_path / "results" / "downstream" / CLS / "mae__ResEncTiny__demo__default__2" / "fold_test"
    metrics.mkdir(parents=True)
    (metrics / "metrics.json").write_text(json.dumps({
        "run": "mae__ResEncTiny__demo__default__2", "dataset": CLS, "task": "cls", "fold": "test",
        "summary": {"balanced_accuracy": 0.875}}))
    runs = probe_histories([metrics / "metrics.json"])
    assert list(runs) == ["mae__ResEncTiny__demo"]
    history, scores = runs["mae__ResEncTiny__demo"]
    assert [float(r[column]) for r in history] == [0.5, 0.75] and scores == {f"{CLS} default": 0.875}
    from openmind_bench.aggregate import plots

    (written,) = plots.probe_curves(runs, tmp_path)
    assert written.name == "probe_curve_mae__ResEncTiny__demo.png" and written.stat().st_size > 0
