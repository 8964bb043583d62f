"""The fine-tuning engine: schedules on the optimiser, Frozen keeps the encoder bit-identical, and
short fine-tunes on the demo downstream sets write per-case metrics in the aggregation shape."""

import json
import math

import pytest
import torch

from openmind_bench import config as omb_config
from openmind_bench import names, nets
from openmind_bench.aggregate.collect import collect, read_metrics_json
from openmind_bench.downstream import finetune, schedules, settings as run_settings, splits, transfer
from openmind_bench.downstream.readers import case_table, read_dataset
from openmind_bench.registry import load_registry

from test_transfer import pretrained_checkpoint

REGISTRY = "config/downstream_demo.yaml"


def _settings(root, tmp_path, dataset, run, checkpoint=None, **overrides):
    spec = load_registry(REGISTRY, root).get(dataset)
    split = tmp_path / f"{dataset}_split.json"
    splits.ensure_split(split, case_table(read_dataset(spec)), dataset, spec.role)
    config = omb_config.validate(
        {"downstream_registry": REGISTRY, "downstream": {"root": str(root), "steps_per_epoch": 2, **overrides},
         "finetune": {"scratch_patch_size": [32, 32, 32], "spacing": [3.5, 3.5, 3.5]}}, omb_config.SCHEMA_PATH)
    out = tmp_path / "results" / "downstream" / dataset / run / "fold_test"
    s = run_settings.resolve(config, dataset, run, "test", out_dir=str(out), split=str(split),
                             pretrained_checkpoint=str(checkpoint) if checkpoint else None)
    s.threads = 2
    return s


def test_run_names_round_trip_and_targets(downstream_root):
    for run in ["mae__ResEncL__openmind__sawtooth__150", "scratch__PrimusM__1000",
                "mae__ResEncL__t1.v2-x_y__frozen__150__n8"]:
        assert str(names.parse_run(run)) == run
    name = names.parse_run("mae__ResEncL__t1.v2-x_y__frozen__150__n8")
    assert (name.method, name.selection, name.schedule, name.epochs, name.low_data_n) == \
        ("mae", "t1.v2-x_y", "frozen", 150, 8)
    with pytest.raises(names.InvalidName, match="neither"):  # '__' only ever separates parts
        names.parse_run("mae__ResEncL__my__selection__frozen__150")
    config = omb_config.validate(
        {"downstream_registry": REGISTRY,
         "downstream": {"root": str(downstream_root), "schedules": ["default", "frozen"], "epochs": [2]},
         "finetune": {"scratch_architectures": ["ResEncTiny"], "pretrained_runs": ["mae__ResEncTiny__demo"],
                      "evaluate_folds": ["test", 0]}}, omb_config.SCHEMA_PATH)
    targets = run_settings.targets(config, ["mae__ResEncTiny__demo", "mae__PrimusTiny__demo"])
    # 3 runs x (DemoLesionT1: test + fold 0; the two test-role sets: test only)
    assert len(targets) == 3 * 4
    assert "results/downstream/DemoLesionT1/scratch__ResEncTiny__2/fold_0/metrics.json" in targets
    assert not any("PrimusTiny" in t for t in targets)
    with pytest.raises(ValueError, match="not pre-training runs"):
        run_settings.run_names(omb_config.validate({"finetune": {"pretrained_runs": ["x__y__z"]}},
                                                   omb_config.SCHEMA_PATH), ["mae__ResEncTiny__demo"])


def test_schedules_on_the_optimiser_give_the_closed_form_lr():
    torch.manual_seed(0)
    net = nets.resolve("ResEncTiny").build([32, 32, 32])
    groups = transfer.parameter_groups(net, nets.adaptation_keys(net))
    assert all(groups[g] for g in schedules.GROUPS)
    peak, steps = 1e-3, 3
    schedule = schedules.build_schedule("sawtooth", 10, peak, steps, decoder_warmup=4, whole_warmup=2)
    cfg = {"optimizer": "sgd", "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}
    # epoch -> (decoder lr, encoder lr): decoder warm-up over 2, decoder poly over 2, whole warm-up
    # over 2 (to the full peak), poly over 4.
    expected = {0: (peak / 2, 0.0), 1: (peak, 0.0), 2: (peak, 0.0), 3: (peak * 0.5 ** 0.9, 0.0),
                4: (peak / 2, peak / 2), 5: (peak, peak), 6: (peak, peak), 8: (peak * 0.5 ** 0.9,) * 2,
                9: (peak * 0.25 ** 0.9,) * 2}
    phase, optimizer = None, None
    for step in range(schedule.total_steps):
        current = schedule.phase_at(step)[0]
        if current is not phase:
            phase = current
            optimizer = finetune.apply_phase(net, groups, phase.trainable, cfg, torch.device("cpu"))
        finetune.set_learning_rates(optimizer, schedule, step)
        epoch = step // steps
        if epoch not in expected:
            continue
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        decoder, encoder = expected[epoch]
        assert math.isclose(lrs["decoder"], decoder, rel_tol=1e-12)
        if encoder == 0.0:
            assert set(lrs) == {"decoder"}  # frozen groups have no optimiser slot
            assert not any(p.requires_grad for _, p in groups["encoder"] + groups["stem"])
        else:
            assert math.isclose(lrs["encoder"], encoder, rel_tol=1e-12)
            assert math.isclose(lrs["stem"], encoder, rel_tol=1e-12)


def test_frozen_keeps_encoder_bit_identical_and_writes_metrics(downstream_root, tmp_path):
    ckpt = tmp_path / "mae__ResEncTiny__demo" / "checkpoint_final.pt"
    ckpt.parent.mkdir()
    pre = pretrained_checkpoint(ckpt, "ResEncTiny")
    s = _settings(downstream_root, tmp_path, "DemoLesionT1FLAIR", "mae__ResEncTiny__demo__frozen__2", ckpt)
    assert finetune.run(s) == "finished"
    out = tmp_path / "results" / "downstream" / "DemoLesionT1FLAIR" / "mae__ResEncTiny__demo__frozen__2" / "fold_test"
    tuned = torch.load(out / finetune.FINAL, weights_only=True)["network_weights"]
    encoder = [k for k in tuned if k.startswith("encoder.stages")]
    assert encoder and all(torch.equal(tuned[k], pre[k]) for k in encoder)
    stem = "encoder.stem.convs.0.conv.weight"  # two input channels: repeated, halved, then kept frozen
    assert torch.equal(tuned[stem], pre[stem].repeat(1, 2, 1, 1, 1) / 2)
    torch.manual_seed(finetune.derive_seed(s.seed, finetune._TAG_INIT))  # the engine's initial network
    spec = load_registry(REGISTRY, downstream_root).get("DemoLesionT1FLAIR")
    initial = finetune.build_model(s, spec, names.parse_run(s.run))[0].state_dict()
    assert all(torch.equal(initial[k], tuned[k]) for k in encoder)
    assert any(not torch.equal(tuned[k], initial[k]) for k in tuned if k.startswith("decoder.stages"))

    doc = json.loads((out / "metrics.json").read_text())
    split = splits.read_split(s.split)
    assert [c["case"] for c in doc["cases"]] == sorted(split["test"])
    assert (doc["method"], doc["architecture"], doc["schedule"], doc["selection"], doc["epochs"], doc["fold"]) == \
        ("mae", "ResEncTiny", "frozen", "demo", 2, "test")
    assert all(0.0 <= c["DSC"] <= 1.0 and 0.0 <= c["NSD"] <= 1.0 and "lesion" in c["per_class"]
               for c in doc["cases"] if c["DSC"] is not None)
    read_metrics_json(out / "metrics.json")  # the aggregation stage accepts it
    table = collect([out / "metrics.json"])
    assert set(table.metric) == {"DSC", "NSD"} and set(table.case) == set(split["test"])
    assert (out / "metrics.csv").read_text().startswith("case,DSC,NSD")
    assert sorted(p.name for p in (out / "predictions").iterdir()) == sorted(f"{c}.nii.gz" for c in split["test"])


def test_scratch_classification_writes_balanced_accuracy_and_auroc(downstream_root, tmp_path):
    s = _settings(downstream_root, tmp_path, "DemoPatientCls", "scratch__PrimusTiny__2")
    assert finetune.run(s) == "finished"
    doc = json.loads((tmp_path / "results" / "downstream" / "DemoPatientCls" / "scratch__PrimusTiny__2" / "fold_test"
                      / "metrics.json").read_text())
    assert doc["task"] == "cls" and doc["method"] == "scratch" and "schedule" not in doc
    assert set(doc["summary"]) >= {"balanced_accuracy", "AUROC"}
    assert all(set(c["probabilities"]) == {"control", "patient"} for c in doc["cases"])


def test_preempted_run_resumes_and_finishes(downstream_root, tmp_path, monkeypatch):
    import signal

    s = _settings(downstream_root, tmp_path, "DemoPatientCls", "scratch__ResEncTiny__3", epochs=[3])
    calls = {"n": 0}
    real_step = finetune.train_step

    def step_then_stop(model, view, optimizer, grad_scaler, grad_clip, amp_context, ctx, stop):
        calls["n"] += 1
        if calls["n"] == 4:  # second step of the second epoch
            stop.signal = signal.SIGTERM
        return real_step(model, view, optimizer, grad_scaler, grad_clip, amp_context, ctx, stop)

    monkeypatch.setattr(finetune, "train_step", step_then_stop)
    assert finetune.run(s) == "preempted"
    out = tmp_path / "results" / "downstream" / "DemoPatientCls" / "scratch__ResEncTiny__3" / "fold_test"
    assert (out / finetune.LATEST).exists() and not (out / "metrics.json").exists()
    assert torch.load(out / finetune.LATEST, weights_only=True)["current_epoch"] == 1
    monkeypatch.setattr(finetune, "train_step", real_step)
    assert finetune.run(s) == "finished"
    assert (out / "metrics.json").exists() and not (out / finetune.LATEST).exists()
    epochs = [line.split(",")[0] for line in (out / "progress.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]
