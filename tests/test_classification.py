"""Classification fine-tuning on the shared engine: the protocol's epochs (passes, accumulated
micro-batches), schedules on the optimiser, Frozen keeps the encoder bit-identical, resume after
preemption, and metrics in the aggregation shape. (Segmentation runs in nnU-Net: test_nnunet.py.)"""

import contextlib
import copy
import json
import math
from pathlib import Path

import pytest
import torch

from openmind_bench import config as omb_config
from openmind_bench import names, nets
from openmind_bench.aggregate.collect import collect, read_metrics_json
from openmind_bench.downstream import classification, schedules, settings as run_settings, splits, transfer
from openmind_bench.downstream.readers import case_table, read_dataset
from openmind_bench.engine import distributed, step as engine_step
from openmind_bench.registry import load_registry

from test_transfer import pretrained_checkpoint

REGISTRY = "config/downstream_demo.yaml"
CLS = "DemoPatientCls"


def _settings(root, tmp_path, dataset, run, checkpoint=None, classification_overrides=None, **overrides):
    spec = load_registry(REGISTRY, root).get(dataset)
    split = tmp_path / f"{dataset}_split.json"
    splits.ensure_split(split, case_table(read_dataset(spec)), dataset, spec.role)
    config = omb_config.validate(
        {"downstream_registry": REGISTRY,
         "downstream": {"root": str(root), **overrides,
                        "classification": {"epochs": None, "warmup_epochs": 1, "batch_size": 2,
                                           "accumulation_steps": 2, "steps_per_epoch": 1,
                                           **(classification_overrides or {})}},
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


def test_an_epoch_is_one_pass_in_accumulated_micro_batches():
    # the protocol: batch 1, 48 accumulated; 100 cases -> steps of 48, 48, 4 samples, each case once
    plan = classification.epoch_plan(100, 1, 48, None, seed=0, epoch=3)
    assert [sum(len(m) for m in step) for step in plan] == [48, 48, 4]
    assert sorted(i for step in plan for m in step for i in m) == list(range(100))
    assert plan == classification.epoch_plan(100, 1, 48, None, seed=0, epoch=3)  # a function of seed and epoch
    assert plan != classification.epoch_plan(100, 1, 48, None, seed=0, epoch=4)
    # batch 2 over 7 cases: whole micro-batches, the pass padded from its own start
    plan = classification.epoch_plan(7, 2, 3, None, seed=1, epoch=0)
    assert [len(m) for step in plan for m in step] == [2, 2, 2, 2] and [len(s) for s in plan] == [3, 1]
    flat = [i for step in plan for m in step for i in m]
    assert sorted(flat[:7]) == list(range(7)) and flat[7] == flat[0]
    # fixed steps: full steps, the order going on over further passes
    plan = classification.epoch_plan(5, 2, 2, 4, seed=0, epoch=0)
    flat = [i for step in plan for m in step for i in m]
    assert len(plan) == 4 and len(flat) == 16 and sorted(flat[:5]) == list(range(5))


def test_accumulated_micro_batches_give_the_full_batch_gradient():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    objective = classification.Objective(net, label_smoothing=0.2)
    images, targets = torch.randn(4, 6), torch.tensor([0, 2, 1, 2])
    ctx = distributed.Context(0, 1, 0, torch.device("cpu"))

    def one_step(views):
        model = copy.deepcopy(objective)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss, _ = engine_step.train_step(model, views, optimizer, None, math.inf, contextlib.nullcontext(), ctx, None)
        return loss, [p.detach().clone() for p in model.parameters()]

    whole_loss, whole = one_step({"image": images, "target": targets})
    parts_loss, parts = one_step([{"image": images[i:i + 1], "target": targets[i:i + 1]} for i in range(4)])
    assert torch.allclose(whole_loss, parts_loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, parts))
    assert not all(torch.equal(a, b) for a, b in zip(whole, objective.parameters()))  # it did step

    bad = [{"image": images[:2], "target": targets[:2]}, {"image": images[2:] * float("nan"), "target": targets[2:]}]
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        one_step(bad)


def test_default_runs_train_the_protocols_warm_start_and_cosine(downstream_root, tmp_path):
    # the schema's protocol (200 epochs, 20 of them warm-start): lr at epochs 0, 19, 20 and the last
    # by hand, lr * (e + 1) / 21 then lr * (1 + cos(pi * k / 180)) / 2 (test_schedules has the source)
    s = _settings(downstream_root, tmp_path, CLS, "scratch__ResEncTiny__150",
                  classification_overrides={"epochs": 200, "warmup_epochs": 20})
    defaults = omb_config.section("downstream")["classification"]
    assert (defaults["epochs"], defaults["warmup_epochs"], defaults["batch_size"], defaults["accumulation_steps"],
            defaults["grad_clip"]) == (200, 20, 2, 48, None)
    assert omb_config.section("finetune")["amp_dtype"] == "float16"  # precision '16-mixed': fp16 + grad scaler
    for run in ("scratch__ResEncTiny__150", "mae__ResEncTiny__demo__default__150"):
        schedule = classification.build_schedule(s, names.parse_run(run), "cnn", 200, 2)
        lrs = {e: schedule.lrs(e * 2 + 1) for e in (0, 19, 20, 199)}
        assert all(len(set(v.values())) == 1 for v in lrs.values())  # one rate for the whole net
        got = {e: v["encoder"] for e, v in lrs.items()}
        assert got == pytest.approx({0: 4.761904761904762e-06, 19: 9.523809523809524e-05, 20: 1e-4,
                                     199: 7.615242180436521e-09}, rel=1e-9)
    frozen = classification.build_schedule(s, names.parse_run("mae__ResEncTiny__demo__frozen__150"), "cnn", 150, 2)
    assert frozen.name == "frozen"  # a named schedule keeps its own warm-ups
    s.classification["warmup_epochs"] = 250
    with pytest.raises(schedules.ScheduleError, match="downstream.classification.warmup_epochs"):
        classification.build_schedule(s, names.parse_run("scratch__ResEncTiny__150"), "cnn", 200, 2)


def test_training_samples_are_the_references_augmentation_of_a_centre_crop():
    import numpy as np

    from openmind_bench.downstream import volumes

    augment = volumes.classification_augmentation([16, 16, 16])
    kinds = [(type(t.transform).__name__, t.apply_probability) if hasattr(t, "transform") else (type(t).__name__, 1)
             for t in augment.transforms]
    assert kinds == [("SpatialTransform", 1), ("GaussianNoiseTransform", 0.1), ("GaussianBlurTransform", 0.2),
                     ("MultiplicativeBrightnessTransform", 0.15), ("ContrastTransform", 0.15),
                     ("SimulateLowResolutionTransform", 0.25), ("GammaTransform", 0.1), ("GammaTransform", 0.3),
                     ("MirrorTransform", 1)]
    spatial = augment.transforms[0]
    assert (spatial.random_crop, spatial.p_rotation, spatial.rotation, spatial.p_scaling, spatial.scaling,
            spatial.p_elastic_deform) == (False, 0.2, 0.523599, 0.2, (0.7, 1.4), 0)
    assert [t.transform.p_invert_image for t in augment.transforms[6:8]] == [1, 0]

    image = np.random.default_rng(0).standard_normal((1, 24, 28, 20)).astype(np.float32)
    volume = volumes.Volume("c", image.copy(), 1, image.shape[1:], (1.0, 1.0, 1.0))
    centre = torch.as_tensor(image[:, 4:20, 6:22, 2:18])
    flips = [centre.flip([a + 1 for a in axes]) for axes in
             ([], [0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2])]
    before = (np.random.get_state()[1][:4].copy(), torch.random.get_rng_state())
    samples = [volumes.augmented_sample(augment, volume, seed)["image"] for seed in range(60)]
    assert np.array_equal(volume.image, image)  # the case in memory stays as loaded
    assert all(s.shape == (1, 16, 16, 16) for s in samples)
    assert torch.equal(samples[7], volumes.augmented_sample(augment, volume, 7)["image"])  # a function of the seed
    plain = [any(torch.equal(s, f) for f in flips) for s in samples]
    # the centre crop, mirrored, when no other transform fires (p ~0.14); augmented otherwise
    assert 0 < sum(plain) < len(plain)
    assert len({tuple(torch.nonzero(torch.stack([s != f for f in flips]).flatten(1).any(1) == 0).flatten().tolist())
                for s, ok in zip(samples, plain) if ok}) > 1  # several mirrorings
    assert (np.random.get_state()[1][:4] == before[0]).all() and torch.equal(torch.random.get_rng_state(), before[1])


def test_schedules_on_the_optimiser_give_the_closed_form_lr():
    torch.manual_seed(0)
    net = nets.resolve("ResEncTiny").build([32, 32, 32])
    groups = transfer.parameter_groups(net, nets.adaptation_keys(net))
    assert all(groups[g] for g in schedules.GROUPS)
    peak, steps = 1e-3, 3
    schedule = schedules.build_schedule("sawtooth", 10, peak, steps, decoder_warmup=4, whole_warmup=2)
    cfg = {"optimizer": "adamw", "betas": [0.9, 0.999], "weight_decay": 1e-2}
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
            optimizer = classification.apply_phase(net, groups, phase.trainable, cfg, torch.device("cpu"))
        classification.set_learning_rates(optimizer, schedule, step)
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


def test_phase_changes_keep_or_renew_the_optimiser_as_the_segmentation_trainer():
    torch.manual_seed(0)
    net = nets.resolve("ResEncTiny").build([32, 32, 32])
    groups = transfer.parameter_groups(net, nets.adaptation_keys(net))
    cfg = {"optimizer": "adamw", "betas": [0.9, 0.999], "weight_decay": 1e-2}
    custom = {"grow": [{"name": "head", "trainable": ["decoder"], "epochs": 2},
                       {"name": "all", "trainable": "all", "fresh_optimizer": False}]}
    # steps where a new optimiser starts (one step per epoch): frozen's poly phase, sawtooth's whole net
    for name, renewed_at in (("warmup", []), ("frozen", [2]), ("sawtooth", [2]), ("grow", [])):
        schedule = schedules.build_schedule(name, 5, 1e-3, 1, decoder_warmup=2, whole_warmup=1, custom=custom)
        phase, optimizer, renewed = None, None, []
        for step in range(schedule.total_steps):
            current = schedule.phase_at(step)[0]
            if current is not phase:
                kept = optimizer
                optimizer = classification.enter_phase(current, phase, optimizer, net, groups, cfg,
                                                       torch.device("cpu"))
                if phase is not None and optimizer is not kept:
                    renewed.append(step)
                phase = current
        assert renewed == renewed_at, name
        trained = {"decoder"} if name == "frozen" else set(schedules.GROUPS)  # "grow": stem, encoder added
        assert {g["name"] for g in optimizer.param_groups} == trained, name
        assert all(p.requires_grad == (g in trained) for g, named in groups.items() for _, p in named), name


def test_frozen_keeps_encoder_bit_identical_and_writes_metrics(downstream_root, tmp_path):
    ckpt = tmp_path / "mae__ResEncTiny__demo" / "checkpoint_final.pt"
    ckpt.parent.mkdir()
    pre = pretrained_checkpoint(ckpt, "ResEncTiny")
    run = "mae__ResEncTiny__demo__frozen__2"
    s = _settings(downstream_root, tmp_path, CLS, run, ckpt)
    assert classification.run(s) == "finished"
    out = tmp_path / "results" / "downstream" / CLS / run / "fold_test"
    tuned = torch.load(out / classification.FINAL, weights_only=True)["network_weights"]
    encoder = [k for k in tuned if k.startswith("backbone.encoder.")]
    assert encoder and all(torch.equal(tuned[k], pre[k.removeprefix("backbone.")]) for k in encoder)
    torch.manual_seed(classification.derive_seed(s.seed, classification._TAG_INIT))  # the engine's initial net
    spec = load_registry(REGISTRY, downstream_root).get(CLS)
    initial = classification.build_model(s, spec, names.parse_run(s.run))[0].state_dict()
    assert all(torch.equal(initial[k], tuned[k]) for k in encoder)
    assert not torch.equal(initial["head.weight"], tuned["head.weight"])

    doc = json.loads((out / "metrics.json").read_text())
    split = splits.read_split(s.split)
    assert [c["case"] for c in doc["cases"]] == sorted(split["test"])
    assert (doc["method"], doc["architecture"], doc["schedule"], doc["selection"], doc["epochs"], doc["fold"]) == \
        ("mae", "ResEncTiny", "frozen", "demo", 2, "test")
    assert doc["training"] == {"epochs": 2, "optimiser_steps_per_epoch": 1, "batch_size": 2,
                               "accumulation_steps": 2, "effective_batch": 4}
    read_metrics_json(out / "metrics.json")  # the aggregation stage accepts it
    table = collect([out / "metrics.json"])
    assert {"balanced_accuracy", "AUROC"} <= set(table.metric)


def test_scratch_classification_trains_the_protocol_length(downstream_root, tmp_path):
    run = "scratch__PrimusTiny__2"
    s = _settings(downstream_root, tmp_path, CLS, run, classification_overrides={"epochs": 3, "steps_per_epoch": None})
    assert classification.run(s) == "finished"
    out = tmp_path / "results" / "downstream" / CLS / run / "fold_test"
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["task"] == "cls" and doc["method"] == "scratch" and "schedule" not in doc
    assert doc["epochs"] == 2  # the run's name, so the row sits beside its segmentation results
    n_train = len(splits.read_split(s.split)["train"])
    assert doc["training"]["epochs"] == 3 and doc["training"]["optimiser_steps_per_epoch"] == math.ceil(n_train / 4)
    assert set(doc["summary"]) >= {"balanced_accuracy", "AUROC"}
    assert all(set(c["probabilities"]) == {"control", "patient"} for c in doc["cases"])
    schedule = json.loads((out / "schedule.json").read_text())
    assert schedule["name"] == "cosine" and schedule["epochs"] == 3 and schedule["peak_lr"] == 1e-4
    assert [(p["curve"], p["epochs"]) for p in schedule["phases"]] == [("warmstart", 1), ("cosine", 2)]
    assert [line.split(",")[0] for line in (out / "progress.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]


def test_segmentation_datasets_are_not_this_engines(downstream_root, tmp_path):
    s = _settings(downstream_root, tmp_path, "DemoLesionT1", "scratch__ResEncTiny__2")
    with pytest.raises(ValueError, match="DemoLesionT1 is a seg dataset.*nnU-Net"):
        classification.run(s)


def test_finetune_command_makes_the_split_and_runs_a_classification_job(downstream_root, tmp_path):
    import yaml

    from openmind_bench.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "downstream": {"classification": {"epochs": 1, "warmup_epochs": 0, "batch_size": 2, "accumulation_steps": 1,
                                          "steps_per_epoch": 1}},
        "finetune": {"scratch_patch_size": [32, 32, 32], "spacing": [3.5, 3.5, 3.5]}}))
    split, out = tmp_path / "split.json", tmp_path / "run"
    assert main(["finetune", "--dataset", CLS, "--run", "scratch__ResEncTiny__1", "--split", str(split),
                 "--out", str(out), "--config", str(config), "--registry", REGISTRY, "--root", str(downstream_root),
                 "--threads", "1"]) == 0
    assert "folds" not in json.loads(split.read_text())  # a test-role set: no folds
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["training"]["epochs"] == 1 and len(doc["cases"]) == len(json.loads(split.read_text())["test"])


def _final(out):
    return torch.load(out / classification.FINAL, weights_only=True)["network_weights"]


def _losses(out):
    return [line.split(",")[1] for line in (out / "progress.csv").read_text().splitlines()[1:]]


def test_a_run_cut_in_mid_epoch_or_at_its_end_resumes_bit_for_bit_with_its_grad_scaler(downstream_root, tmp_path,
                                                                                       monkeypatch):
    """Cut by SIGTERM in step 1 of epoch 2, or in its last step, and resumed: the weights, the logged
    losses and the GradScaler's scale are the uncut run's (the checkpoint holds the step, the partial
    loss sums and the scaler; dropout and augmentation are functions of the step)."""
    import signal

    scalers = []

    def cpu_scaler(*args):  # CPU runs have none: one that doubles its scale every step shows its state
        scalers.append(torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=1))
        return scalers[-1]

    monkeypatch.setattr(classification, "make_grad_scaler", cpu_scaler)
    real_step = classification.train_step

    def run(label, stop_at=None):
        s = _settings(downstream_root, tmp_path / label, CLS, "scratch__ResEncTiny__2", epochs=[2],
                      classification_overrides={"steps_per_epoch": 2})
        calls = {"n": 0}

        def step(*args, **kwargs):
            calls["n"] += 1
            views = args[1]
            assert len(views) == 2 and views[0]["image"].shape[0] == 2  # 2 micro-batches of 2
            if calls["n"] == stop_at:
                args[7].signal = signal.SIGTERM
            return real_step(*args, **kwargs)

        monkeypatch.setattr(classification, "train_step", step)
        outcomes = [classification.run(s)]
        out = tmp_path / label / "results" / "downstream" / CLS / "scratch__ResEncTiny__2" / "fold_test"
        if stop_at:
            saved = torch.load(out / classification.LATEST, weights_only=True)
            assert (saved["current_epoch"], saved["step_in_epoch"]) == (1, stop_at - 2)
            assert saved["grad_scaler"]["scale"] == 16.0 * 2 ** stop_at
            assert not (out / "metrics.json").exists()
            outcomes.append(classification.run(s))
            assert (out / "metrics.json").exists() and not (out / classification.LATEST).exists()
            assert [line.split(",")[0] for line in (out / "progress.csv").read_text().splitlines()[1:]] == ["1", "2"]
        return outcomes, out, scalers[-1].get_scale()

    uncut, out, scale = run("uncut")
    assert uncut == ["finished"] and scale == 16.0 * 2 ** 4
    expected = _final(out)
    assert not (out / classification.CASES).exists()  # the preprocessed cases go with the run
    for label, stop_at in (("mid", 3), ("end", 4)):
        outcomes, cut, cut_scale = run(label, stop_at)
        assert outcomes == ["preempted", "finished"]
        got = _final(cut)
        assert [k for k in expected if not torch.equal(expected[k], got[k])] == [], label
        assert _losses(cut) == _losses(out) and cut_scale == scale, label


def _classification_rank(rank: int, world: int, tmp: str, settings: dict):
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    assert classification.run(run_settings.FinetuneSettings.from_dict(settings)) == "finished"


def test_two_gloo_ranks_share_the_protocols_batch_of_one_and_equal_one_process(downstream_root, tmp_path):
    """Batch 1 with 3 accumulated micro-batches on 2 ranks (before: 'not divisible by 2 processes'):
    rank 0 takes micro-batches 0 and 2, rank 1 takes 1, and a step of one micro-batch leaves rank 1 a
    0-weighted one. The weights and losses are one process's: the effective batch is the protocol's,
    and each micro-batch draws its own dropout masks (seeded by its place in the step, not the rank)."""
    import torch.multiprocessing as mp

    n_train = len(splits.read_split(_settings(downstream_root, tmp_path / "probe", CLS,
                                              "scratch__ResEncTiny__2").split)["train"])
    assert n_train % 3 == 1  # the last step of each pass has one micro-batch: rank 1 pads
    runs = {}
    for label in ("one", "two"):
        s = _settings(downstream_root, tmp_path / label, CLS, "scratch__ResEncTiny__2",
                      classification_overrides={"epochs": 1, "warmup_epochs": 0, "batch_size": 1,
                                                "accumulation_steps": 3, "steps_per_epoch": None})
        s.threads = 1
        runs[label] = (s, Path(s.out_dir))
    assert runs["one"][0].head_dropout > 0
    assert classification.run(runs["one"][0]) == "finished"
    mp.spawn(_classification_rank, args=(2, str(tmp_path), runs["two"][0].to_dict()), nprocs=2, join=True)
    a, b = _final(runs["one"][1]), _final(runs["two"][1])
    # a convolution's bias ahead of an instance norm has a zero gradient up to rounding, which AdamW
    # turns into steps of ~lr: those differ by rounding alone; every other tensor agrees closely
    rounding = {k for k in a if k.endswith(("conv.bias", "all_modules.0.bias"))}
    assert rounding and len(rounding) < len(a) / 4
    assert {k for k in a if k not in rounding and not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6)} == set()
    assert [float(x) for x in _losses(runs["two"][1])] == pytest.approx([float(x) for x in _losses(runs["one"][1])],
                                                                        rel=1e-6)
    assert json.loads((runs["two"][1] / "metrics.json").read_text())["training"]["effective_batch"] == 3


def test_rank_share_deals_micro_batches_and_pads_an_idle_rank():
    step = [[4], [1], [7]]
    assert classification.rank_share(step, 0, 2) == ([(0, [4]), (2, [7])], False)
    assert classification.rank_share(step, 1, 2) == ([(1, [1])], False)
    assert classification.rank_share(step[:1], 1, 2) == ([(0, [4])], True)
    assert classification.rank_share(step, 0, 1) == ([(0, [4]), (1, [1]), (2, [7])], False)


def test_dropout_masks_follow_the_micro_batch_seed_and_leave_the_process_rng_alone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    objective = classification.Objective(net, label_smoothing=0.0).train()
    view = {"image": torch.randn(4, 8), "target": torch.tensor([0, 1, 2, 0])}
    state = torch.random.get_rng_state()
    same = [objective({**view, "seed": 5}) for _ in range(2)]
    other = objective({**view, "seed": 6})
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], other)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert float(objective({**view, "seed": 5, "padding": True})) == 0.0


def test_training_cases_are_preprocessed_once_over_the_ranks_and_memory_mapped(downstream_root, tmp_path,
                                                                              monkeypatch):
    import numpy as np

    from openmind_bench.downstream import volumes

    s = _settings(downstream_root, tmp_path, CLS, "scratch__ResEncTiny__2")
    data = read_dataset(load_registry(REGISTRY, downstream_root).get(CLS), verify_files=False)
    cases = splits.training_cases(s, data, names.parse_run(s.run))[0][:5]
    loaded, real_load = [], volumes.load_case
    monkeypatch.setattr(volumes, "load_case", lambda case, spacing: loaded.append(case.case_id) or
                        real_load(case, spacing))

    class RankOneStops(Exception):
        pass

    def stop_at_barrier(ctx):
        raise RankOneStops

    folder = tmp_path / "cases"
    monkeypatch.setattr(distributed, "barrier", stop_at_barrier)
    with pytest.raises(RankOneStops):  # rank 1 of 2 preprocesses cases 1 and 3, then waits for rank 0
        classification.shared_volumes(cases, s.spacing, folder, distributed.Context(1, 2, 1, torch.device("cpu")))
    assert loaded == [cases[1].case_id, cases[3].case_id]
    monkeypatch.setattr(distributed, "barrier", lambda ctx: None)
    got = classification.shared_volumes(cases, s.spacing, folder, distributed.Context(0, 2, 0, torch.device("cpu")))
    assert sorted(loaded) == sorted(c.case_id for c in cases)  # each case read once over the ranks
    for case, volume in zip(cases, got):
        expected = real_load(case, s.spacing)
        assert isinstance(volume.image, np.memmap) and not volume.image.flags.writeable
        assert np.array_equal(volume.image, expected.image) and volume.target == case.target
        assert (volume.native_shape, volume.native_spacing) == (expected.native_shape, expected.native_spacing)
    with pytest.raises(ValueError, match="holds case"):
        classification.shared_volumes(cases[1:], s.spacing, folder, distributed.Context(0, 1, 0, torch.device("cpu")))


def test_evaluation_runs_in_inference_mode(downstream_root):
    from openmind_bench.downstream import inference
    from openmind_bench.downstream.worker import STATE

    assert classification.CASES in STATE  # a run with other settings removes the cases it left
    spec = load_registry(REGISTRY, downstream_root).get(CLS)
    cases = read_dataset(spec, verify_files=False).cases[:2]
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(1, 2)

        def forward(self, image):
            seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled(), self.training))
            return self.head(image.mean(dim=(1, 2, 3, 4))[:, None])

    identity = inference.identity(CLS, names.parse_run("scratch__ResEncTiny__2"), "test")
    inference.classify(Probe().train(), spec, cases, identity, [16, 16, 16], [3.5, 3.5, 3.5], torch.device("cpu"))
    assert seen == [(True, False, False)] * len(cases)
