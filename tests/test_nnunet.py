"""Segmentation fine-tuning inside nnU-Net v2: the schedule tables drive nnU-Net's optimiser to the
public trainers' closed-form lr, the optimiser keeps its state across phases, encoder + stem come
from the checkpoint while the decoder keeps nnU-Net's init, Frozen keeps the encoder bit-identical,
and a result folder is a model folder `nnUNetv2_predict_from_modelfolder` reproduces."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("nnunetv2")

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: E402

from openmind_bench.aggregate.collect import write_results  # noqa: E402
from openmind_bench.registry import usable_datasets as table_registry  # noqa: E402
from openmind_bench.aggregate.results import read_results  # noqa: E402
from openmind_bench.aggregate.table import build_table  # noqa: E402
from openmind_bench.demo.downstream import build_downstream  # noqa: E402
from openmind_bench.downstream import settings as run_settings, splits  # noqa: E402
from openmind_bench.downstream.nnunet import dataset as nndata, plans as nnplans, run as nnrun  # noqa: E402
from openmind_bench.downstream.nnunet.trainer import nnUNetTrainer_OpenMind  # noqa: E402
from openmind_bench.downstream.readers import case_table, read_dataset  # noqa: E402
from openmind_bench import config as omb_config  # noqa: E402
from openmind_bench.registry import load_registry  # noqa: E402

from test_transfer import pretrained_checkpoint  # noqa: E402

REGISTRY = "config/downstream_demo.yaml"
DATASET = "DemoLesionT1"
PATCH = [32, 32, 32]


@pytest.fixture(scope="module")
def lesion_set(tmp_path_factory):
    """The demo lesion set, its split and nnU-Net's preprocessing (shared by this module's tests)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("nnunet")
    build_downstream(root / "data", seed=0)
    registry = yaml.safe_load(Path(REGISTRY).read_text())  # + a copy of the lesion set scored zero-shot
    registry["datasets"]["DemoZeroShot"] = {**registry["datasets"][DATASET], "role": "test",
                                            "zero_shot_from": DATASET}
    (root / "registry.yaml").write_text(yaml.safe_dump(registry))
    spec = load_registry(root / "registry.yaml", root / "data").get(DATASET)
    data = read_dataset(spec)
    split_path = root / f"{DATASET}.json"
    split = splits.ensure_split(split_path, case_table(data), DATASET, spec.role,
                                splits.SplitSettings(folds=3, test_fraction=0.25))
    results = root / "results" / "downstream" / DATASET
    prepared = nndata.prepare(data, split, results / nndata.DATA_DIR, spacing=[3.5] * 3, n_proc=1)
    return {"root": root, "registry": root / "registry.yaml", "spec": spec, "data": data, "split": split, "split_path": split_path,
            "prepared": prepared, "results": results}


def settings_for(lesion_set, run, checkpoint=None, epochs_steps=1, dataset=DATASET, **downstream):
    config = {"downstream_registry": str(lesion_set["registry"]),
              "downstream": {"root": str(lesion_set["root"] / "data"), "steps_per_epoch": epochs_steps,
                             "nnunet": {"val_iterations_per_epoch": 1}, **downstream},
              "finetune": {"scratch_patch_size": PATCH, "spacing": [3.5] * 3, "sliding_window_overlap": 0.0}}
    out = lesion_set["results"].parent / dataset / run / "fold_test"
    split = lesion_set["split_path"].parent / f"{dataset}.json"
    config = omb_config.validate(config, omb_config.SCHEMA_PATH)
    return run_settings.resolve(config, dataset, run, "test", out_dir=str(out), split=str(split),
                                pretrained_checkpoint=str(checkpoint) if checkpoint else None)


def make_trainer(lesion_set, run, checkpoint=None, seed=0, **downstream):
    s = settings_for(lesion_set, run, checkpoint, **downstream)
    name = run_settings.parse_run(run)
    train, test = splits.partition(lesion_set["split"], "test")
    plans = nnrun.build_plans(s, name, lesion_set["spec"], lesion_set["prepared"]["default_plans"], train, test)
    dataset_json = json.loads((Path(lesion_set["prepared"]["raw"]) / lesion_set["prepared"]["dataset_name"]
                               / "dataset.json").read_text())
    with nndata.environment(lesion_set["prepared"]["raw"], lesion_set["prepared"]["preprocessed"],
                            Path(s.out_dir) / "nnunet"):
        trainer = nnUNetTrainer_OpenMind({**plans, "continue_training": False}, nnplans.CONFIGURATION, 3,
                                         dataset_json, torch.device("cpu"))
        torch.manual_seed(seed)
        trainer.initialize()
    return trainer, plans


# The public trainers' lr per epoch, transcribed from their schedulers (nnU-Net's PolyLRScheduler,
# Lin_incr_LRScheduler, PolyLRScheduler_offset; the fine-tuning branch's Lin_incr_offset_LRScheduler).
def poly(peak, e, n, start=0):
    return peak * (1 - max(e - start, 0) / (n - start)) ** 0.9


def public_lr(schedule, peak, e, n, d=15, w=15, f=1.0):
    if schedule == "default":  # nnUNetTrainer
        return poly(peak, e, n)
    if schedule == "warmup":  # PretrainedTrainer(_150ep), nnU-Net's Primus trainers from scratch
        return peak / w * (1 + e) if e < w else poly(peak, e, n, w)
    if schedule == "frozen":  # PretrainedTrainer_Primus_frozenEnc
        return peak / d * (1 + e) if e < d else poly(peak, e, n, d)
    if schedule == "sawtooth":  # PretrainedTrainer(_Primus)_sawtooth(_150ep)
        h = d // 2
        if e < h:
            return peak * f / h * (1 + e)
        if e < d:
            return poly(peak * f, e, d, h)
        return peak / w * (1 + e - d) if e < d + w else poly(peak, e, n, d + w)
    if schedule == "valley":  # the MAE paper's Valley (no public trainer): decoder poly, then as sawtooth
        if e < d:
            return poly(peak * f, e, d)
        return peak / w * (1 + e - d) if e < d + w else poly(peak, e, n, d + w)
    raise AssertionError(schedule)


CASES = [  # run, schedule, peak, decoder warm-up, whole warm-up, decoder lr factor
    ("mae__ResEncTiny__demo__default__150", "default", 1e-3, 15, 15, 1.0),
    ("mae__ResEncTiny__demo__warmup__150", "warmup", 1e-3, 15, 15, 1.0),
    ("mae__ResEncTiny__demo__frozen__150", "frozen", 1e-3, 15, 15, 1.0),
    ("mae__ResEncTiny__demo__sawtooth__150", "sawtooth", 1e-3, 15, 15, 1.0),
    ("mae__ResEncTiny__demo__valley__150", "valley", 1e-3, 15, 15, 1.0),
    ("mae__PrimusTiny__demo__sawtooth__150", "sawtooth", 1e-4, 15, 50, 0.1),  # Primus Sawtooth-150
    ("mae__PrimusTiny__demo__warmup__150", "warmup", 1e-4, 15, 15, 1.0),
    ("scratch__PrimusTiny__150", "warmup", 3e-4, 15, 15, 1.0),  # nnU-Net's Primus warm-up from scratch
    ("scratch__ResEncTiny__150", "default", 1e-2, 15, 15, 1.0),
]


@pytest.mark.parametrize("run, schedule, peak, d, w, f", CASES)
def test_trainer_lr_equals_the_public_trainers_closed_form(lesion_set, tmp_path, run, schedule, peak, d, w, f):
    arch = "PrimusTiny" if "Primus" in run else "ResEncTiny"
    ckpt = None
    if not run.startswith("scratch"):
        ckpt = tmp_path / "ckpt.pt"
        pretrained_checkpoint(ckpt, arch)
    trainer, _ = make_trainer(lesion_set, run, ckpt)
    for e in (0, 3, 6, 7, 8, 14, 15, 16, 29, 30, 31, 64, 65, 66, 100, 149):
        lr = trainer.apply_epoch(e)
        assert lr == pytest.approx(public_lr(schedule, peak, e, 150, d, w, f), rel=1e-12), (run, e)
        assert all(g["lr"] in (lr, 0.0) for g in trainer.optimizer.param_groups)


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"data": torch.randn(2, 1, *PATCH, generator=g), "target": torch.randint(0, 3, (2, 1, *PATCH), generator=g)}


def test_optimiser_state_survives_phase_changes_where_the_public_trainers_keep_it(lesion_set, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    pretrained_checkpoint(ckpt, "ResEncTiny")
    trainer, _ = make_trainer(lesion_set, "mae__ResEncTiny__demo__sawtooth__150", ckpt,
                              nnunet={"decoder_stage": "decoder_only", "val_iterations_per_epoch": 1})
    optimizer = trainer.optimizer
    trainer.apply_epoch(0)  # decoder warm-up: the decoder alone
    assert {g["name"] for g in optimizer.param_groups} == {"decoder"}
    trainer.train_step(_batch())
    decoder_param = trainer.groups["decoder"][0][1]
    buffer = optimizer.state[decoder_param]["momentum_buffer"]
    trainer.apply_epoch(7)  # decoder warm-up -> decoder poly: kept (sawtooth_trainer.py, 'train_decoder')
    assert trainer.optimizer is optimizer
    assert optimizer.state[decoder_param]["momentum_buffer"] is buffer and buffer.abs().sum() > 0
    trainer.apply_epoch(15)  # -> whole-net warm-up: the public trainer builds a new SGD ('warmup_all')
    whole = trainer.optimizer
    assert whole is not optimizer and not whole.state
    assert {g["name"] for g in whole.param_groups} == {"decoder", "stem", "encoder"}
    trainer.train_step(_batch())
    encoder_param = trainer.groups["encoder"][0][1]
    encoder_buffer = whole.state[encoder_param]["momentum_buffer"]
    trainer.apply_epoch(30)  # whole-net warm-up -> poly: kept ('train')
    assert trainer.optimizer is whole
    assert whole.state[encoder_param]["momentum_buffer"] is encoder_buffer and encoder_buffer.abs().sum() > 0


@pytest.mark.parametrize("schedule, fresh_at", [("warmup", []), ("frozen", [15]), ("valley", [15]),
                                                ("sawtooth", [15]), ("default", [])])
def test_new_optimisers_exactly_where_the_public_trainers_build_them(lesion_set, tmp_path, schedule, fresh_at):
    ckpt = tmp_path / "ckpt.pt"
    pretrained_checkpoint(ckpt, "ResEncTiny")
    trainer, _ = make_trainer(lesion_set, f"mae__ResEncTiny__demo__{schedule}__150", ckpt)
    trainer.apply_epoch(0)
    seen, changed = trainer.optimizer, []
    for e in range(1, 150):
        trainer.apply_epoch(e)
        if trainer.optimizer is not seen:
            changed.append(e)
            seen = trainer.optimizer
    assert changed == fresh_at


def test_published_decoder_stage_trains_the_encoder_that_the_decoder_references(lesion_set, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    pretrained_checkpoint(ckpt, "ResEncTiny")
    trainer, _ = make_trainer(lesion_set, "mae__ResEncTiny__demo__sawtooth__150", ckpt)
    assert trainer.decoder_holds_encoder()
    trainer.apply_epoch(0)
    assert {g["name"] for g in trainer.optimizer.param_groups} == {"decoder", "stem", "encoder"}
    frozen, _ = make_trainer(lesion_set, "mae__ResEncTiny__demo__frozen__150", ckpt)
    assert {g["name"] for g in frozen.optimizer.param_groups} == {"decoder"}  # frozen stays frozen


def test_encoder_and_stem_from_checkpoint_decoder_with_nnunet_init(lesion_set, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    pre = pretrained_checkpoint(ckpt, "ResEncTiny")
    trainer, plans = make_trainer(lesion_set, "mae__ResEncTiny__demo__warmup__150", ckpt, seed=5)
    state = trainer.network.state_dict()
    encoder_keys = [k for k in state if k.startswith("encoder.")]
    assert encoder_keys and all(torch.equal(state[k], pre[k]) for k in encoder_keys)
    arch = plans["configurations"][nnplans.CONFIGURATION]["architecture"]
    torch.manual_seed(5)
    reference = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                       1, 3, allow_init=True, deep_supervision=False).state_dict()
    decoder_keys = [k for k in state if k.startswith("decoder.") and not k.startswith("decoder.encoder.")]
    assert decoder_keys and all(torch.equal(state[k], reference[k]) for k in decoder_keys)
    # InitWeights_He(1e-2) zeroes conv biases (PyTorch's default init does not)
    assert all(not state[k].any() for k in decoder_keys if k.endswith(".bias") and "conv" in k)
    scratch, _ = make_trainer(lesion_set, "scratch__ResEncTiny__150")
    zeroed = [k for k in scratch.network.state_dict() if k.endswith("conv2.norm.weight")]
    assert zeroed and all(not scratch.network.state_dict()[k].any() for k in zeroed)  # last norm before the add


def test_wrong_checkpoint_architecture_names_the_key(lesion_set, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    pretrained_checkpoint(ckpt, "PrimusTiny")
    s = settings_for(lesion_set, "mae__ResEncTiny__demo__warmup__150", ckpt)
    name = run_settings.parse_run(s.run)
    plans = nnrun.build_plans(s, name, lesion_set["spec"], lesion_set["prepared"]["default_plans"], [], [])
    # the plans follow the checkpoint's adaptation plan, not the run name
    assert plans["configurations"][nnplans.CONFIGURATION]["architecture"]["network_class_name"] == nnplans.PRIMUS_CLASS
    with pytest.raises(nnplans.PlansError, match="not a multiple"):
        nnplans.architecture(None, "PrimusTiny", None, [36, 36, 36])


@pytest.mark.slow  # a whole nnU-Net run (preprocessing, training, prediction) and the nnU-Net command
def test_frozen_run_writes_metrics_and_a_model_folder_nnunet_predicts_from(lesion_set, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt.pt"
    pre = pretrained_checkpoint(ckpt, "ResEncTiny")
    s = settings_for(lesion_set, "mae__ResEncTiny__demo__frozen__2", ckpt, epochs_steps=2)
    assert nnrun.finetune_segmentation(s, threads=1) == "finished"
    out = Path(s.out_dir)
    doc = json.loads((out / "metrics.json").read_text())
    test_cases = lesion_set["split"]["test"]
    assert sorted(r["case"] for r in doc["cases"]) == sorted(test_cases) and doc["fold"] == "test"
    assert doc["inference"] == {"sliding_window_overlap": 0.0, "test_time_mirroring": True}
    model = nnrun.model_folder(out / "nnunet", lesion_set["prepared"]["dataset_name"])
    fold = nndata.nnunet_fold(lesion_set["split"], "test")
    final = torch.load(model / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = final["network_weights"]
    assert all(torch.equal(weights[k], pre[k]) for k in weights if k.startswith("encoder."))  # bit-identical
    # nnU-Net's own command on the result folder reproduces the stored predictions
    images = tmp_path / "images"
    images.mkdir()
    for case in lesion_set["data"].cases:
        if case.case_id in test_cases:
            for c, image in enumerate(case.images):
                (images / f"{case.case_id}_{c:04d}.nii.gz").symlink_to(image)
    env = {**os.environ, "nnUNet_extTrainer": nnrun.ext_trainer_path(), "nnUNet_n_proc_DA": "1",
           "nnUNet_raw": str(tmp_path), "nnUNet_preprocessed": str(tmp_path), "nnUNet_results": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    cli = Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"
    command = [str(cli), "-i", str(images), "-m", str(model), "-f", str(fold), "-chk", "checkpoint_final.pth",
               "-step_size", str(1 - s.sliding_window_overlap), "-device", "cpu", "-npp", "1", "-nps", "1"]
    subprocess.run([*command, "-o", str(tmp_path / "pred")], check=True, env=env, capture_output=True)
    # test_time_mirroring: false is nnU-Net's own --disable_tta
    subprocess.run([*command, "-o", str(tmp_path / "pred_notta"), "--disable_tta"], check=True, env=env,
                   capture_output=True)
    cases = [c for c in lesion_set["data"].cases if c.case_id in test_cases]
    monkeypatch.setenv("nnUNet_extTrainer", nnrun.ext_trainer_path())
    with nndata.environment(None, None, None, 1):
        no_tta = nnrun.predict(model, fold, cases, tmp_path / "ours_notta", nnrun.device_for(1),
                               1 - s.sliding_window_overlap, mirroring=False)
    import nibabel as nib

    for case in test_cases:
        ours = np.asarray(nib.load(str(out / "predictions" / f"{case}.nii.gz")).dataobj)
        theirs = np.asarray(nib.load(str(tmp_path / "pred" / f"{case}.nii.gz")).dataobj)
        assert np.array_equal(ours, theirs), case
        theirs = np.asarray(nib.load(str(tmp_path / "pred_notta" / f"{case}.nii.gz")).dataobj)
        assert np.array_equal(np.asarray(nib.load(str(no_tta[case])).dataobj), theirs), case

    # zero-shot: the same run's model scores another dataset's test split, and the row reaches the table
    zs_spec = load_registry(lesion_set["registry"], lesion_set["root"] / "data").get("DemoZeroShot")
    splits.ensure_split(lesion_set["split_path"].parent / "DemoZeroShot.json", case_table(read_dataset(zs_spec)),
                        "DemoZeroShot", "test", splits.SplitSettings(folds=0, test_fraction=0.25))
    zs = settings_for(lesion_set, s.run, ckpt, dataset="DemoZeroShot")
    assert nnrun.finetune_segmentation(zs, threads=1) == "finished"
    zs_doc = json.loads((Path(zs.out_dir) / "metrics.json").read_text())
    assert zs_doc["zero_shot_from"] == DATASET and not (Path(zs.out_dir) / "nnunet").exists()  # nothing trained
    write_results([out / "metrics.json", Path(zs.out_dir) / "metrics.json"], tmp_path / "results.tsv")
    table = build_table(read_results(tmp_path / "results.tsv"), table_registry(lesion_set["registry"]))
    assert table["DemoZeroShot"].notna().any() and table[DATASET].notna().any()


@pytest.mark.slow  # three short nnU-Net runs of one run folder
def test_a_job_trains_with_its_own_settings_and_reuses_only_an_identical_finished_run(lesion_set, tmp_path, caplog):
    """What Snakemake does on a changed param or --forcerun: metrics.json removed, the rest of the run
    folder (nnU-Net's checkpoint_final.pth) left. The job must train with the settings it was given;
    only a run with equal settings and inputs (checkpoint sha256) is reused, and the job says so."""
    ckpt = tmp_path / "ckpt.pt"
    pretrained_checkpoint(ckpt, "ResEncTiny")
    run = "mae__ResEncTiny__demo__default__1"
    first = settings_for(lesion_set, run, ckpt, epochs_steps=2)
    out = Path(first.out_dir)
    model = nnrun.model_folder(out / "nnunet", lesion_set["prepared"]["dataset_name"])
    fold_dir = model / f"fold_{nndata.nnunet_fold(lesion_set['split'], 'test')}"
    assert nnrun.finetune_segmentation(first, threads=1) == "finished"
    trained = (fold_dir / "checkpoint_final.pth").read_bytes()
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["training_reused"] is False and doc["run_record"]["inputs"]["checkpoint"]["sha256"]

    # forced with the same settings: the model is reused (said in the log), evaluated again
    (out / "metrics.json").unlink()
    with caplog.at_level(logging.INFO, logger="openmind_bench"):
        nnrun.finetune_segmentation(settings_for(lesion_set, run, ckpt, epochs_steps=2), threads=1)
    assert "reusing the trained model" in caplog.text
    assert (fold_dir / "checkpoint_final.pth").read_bytes() == trained
    assert json.loads((out / "metrics.json").read_text())["training_reused"] is True

    # a changed setting: trained anew with it (the plans say so), a new model, a new record
    (out / "metrics.json").unlink()
    caplog.clear()
    changed = settings_for(lesion_set, run, ckpt, epochs_steps=3)
    with caplog.at_level(logging.INFO, logger="openmind_bench"):
        nnrun.finetune_segmentation(changed, threads=1)
    assert "steps_per_epoch: 2 -> 3" in caplog.text and "reusing" not in caplog.text
    plans = json.loads((model / "plans.json").read_text())
    assert plans["openmind_bench"]["schedule"]["steps_per_epoch"] == 3
    assert (fold_dir / "checkpoint_final.pth").read_bytes() != trained
    new_doc = json.loads((out / "metrics.json").read_text())
    assert new_doc["training_reused"] is False and new_doc["run_record"]["digest"] != doc["run_record"]["digest"]

    # a changed pre-trained checkpoint (same settings): trained anew
    (out / "metrics.json").unlink()
    caplog.clear()
    pretrained_checkpoint(ckpt, "ResEncTiny", seed=2)
    with caplog.at_level(logging.INFO, logger="openmind_bench"):
        nnrun.finetune_segmentation(settings_for(lesion_set, run, ckpt, epochs_steps=3), threads=1)
    assert "checkpoint sha256" in caplog.text and "reusing" not in caplog.text


class _Killed(BaseException):
    """Stands for the job being killed (BaseException: nothing on the way catches it)."""


def test_a_killed_fine_tuning_job_resumes_from_nnunets_latest_checkpoint(lesion_set, tmp_path, monkeypatch):
    """A 3-epoch scratch run killed after epoch 2 (nnU-Net wrote checkpoint_latest.pth, save_every 1):
    the job run again trains epoch 3 alone, from that checkpoint, and finishes."""
    run = "scratch__ResEncTiny__3"
    s = settings_for(lesion_set, run, nnunet={"val_iterations_per_epoch": 1, "save_every": 1})
    started = []
    real_start, real_end = nnUNetTrainer_OpenMind.on_train_epoch_start, nnUNetTrainer_OpenMind.on_epoch_end

    def epoch_start(self):
        started.append(self.current_epoch)
        real_start(self)

    def killed_after_epoch_2(self):
        real_end(self)
        if self.current_epoch == 2:
            raise _Killed

    monkeypatch.setattr(nnUNetTrainer_OpenMind, "on_train_epoch_start", epoch_start)
    monkeypatch.setattr(nnUNetTrainer_OpenMind, "on_epoch_end", killed_after_epoch_2)
    with pytest.raises(_Killed):
        nnrun.finetune_segmentation(s, threads=1)
    model = nnrun.model_folder(Path(s.out_dir) / "nnunet", lesion_set["prepared"]["dataset_name"])
    fold_dir = model / f"fold_{nndata.nnunet_fold(lesion_set['split'], 'test')}"
    latest = torch.load(fold_dir / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 2 and not (fold_dir / "checkpoint_final.pth").exists()
    assert started == [0, 1]

    monkeypatch.setattr(nnUNetTrainer_OpenMind, "on_epoch_end", real_end)
    started.clear()
    assert nnrun.finetune_segmentation(settings_for(lesion_set, run, nnunet={"val_iterations_per_epoch": 1,
                                                                               "save_every": 1}),
                                       threads=1) == "finished"
    assert started == [2]  # resumed, not started over
    assert (fold_dir / "checkpoint_final.pth").exists()
    assert json.loads((Path(s.out_dir) / "metrics.json").read_text())["training_reused"] is False


def test_a_low_data_runs_subset_is_drawn_before_its_record(lesion_set, tmp_path):
    """The record holds the subset's sha256, so the job draws the subset first (the first run of an N
    and seed failed on the missing file)."""
    import dataclasses

    from openmind_bench.downstream.settings import run_record

    subset = tmp_path / f"{DATASET}__n3__s2.json"
    s = dataclasses.replace(settings_for(lesion_set, "scratch__ResEncTiny__1__n3__s2"), low_data_subset=str(subset))
    assert s.seed == 2
    with pytest.raises(FileNotFoundError, match="low_data_subset"):
        run_record(s)
    splits.ensure_run_subset(s)
    doc = json.loads(subset.read_text())
    assert doc["seed"] == 2 and doc["n"] == 3 and set(doc["train"]) <= set(lesion_set["split"]["train"])
    assert run_record(s).summary()
    full = settings_for(lesion_set, "scratch__ResEncTiny__1")
    splits.ensure_run_subset(full)  # not a low-data run: nothing to draw


@pytest.mark.parametrize("arch", ["ResEncTiny", "PrimusTiny"])
def test_lora_trains_only_adapters_decoder_and_stem(lesion_set, tmp_path, arch):
    pytest.importorskip("peft")
    from openmind_bench.downstream import lora

    ckpt = tmp_path / "ckpt.pt"
    pretrained_checkpoint(ckpt, arch)
    trainer, _ = make_trainer(lesion_set, f"mae__{arch}__demo__lora__150", ckpt)
    net = trainer.network
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainer.apply_epoch(3)
    assert {g["name"] for g in trainer.optimizer.param_groups} == {"decoder", "stem", "encoder"}
    for _ in range(2):  # lora_B starts at zero, so lora_A gets a gradient from the second step on
        trainer.train_step(_batch())
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    adapters = {n for n in before if lora.is_adapter(n)}
    stem_names, decoder_names = ({n for n, _ in trainer.groups[g]} for g in ("stem", "decoder"))
    assert {n for n, _ in trainer.groups["encoder"]} == adapters
    assert changed <= adapters | stem_names | decoder_names and stem_names & changed and decoder_names & changed
    assert {n for n in adapters if ".lora_B." in n} <= changed
    # (SGD's second step moves lora_A by lr * B-sized gradients: below float32 resolution for ResEnc)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if ".lora_A." in n)
    frozen = [n for n in before if n not in adapters | stem_names | decoder_names]
    assert frozen and not any(p.requires_grad for n, p in net.named_parameters() if n in frozen)
    share = trainer.trained_parameters
    assert share["count"] == sum(p.numel() for g in ("stem", "encoder", "decoder") for _, p in trainer.groups[g])


@pytest.mark.parametrize("arch", ["ResEncTiny", "PrimusTiny"])
def test_lora_run_leaves_a_plain_model_that_predicts_without_peft(lesion_set, tmp_path, arch, monkeypatch):
    pytest.importorskip("peft")
    ckpt = tmp_path / "ckpt.pt"
    pretrained_checkpoint(ckpt, arch)
    s = settings_for(lesion_set, f"mae__{arch}__demo__lora__1", ckpt, epochs_steps=1)
    assert nnrun.finetune_segmentation(s, threads=1) == "finished"
    out = Path(s.out_dir)
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["schedule"] == "lora" and 0 < doc["trained_parameters"]["share"] < 1
    model = nnrun.model_folder(out / "nnunet", lesion_set["prepared"]["dataset_name"])
    fold = nndata.nnunet_fold(lesion_set["split"], "test")
    assert not (model / f"fold_{fold}" / "checkpoint_best.pth").exists()  # it held the unmerged adapters
    weights = torch.load(model / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    plans = json.loads((model / "plans.json").read_text())
    arch_plan = plans["configurations"][nnplans.CONFIGURATION]["architecture"]
    plain = get_network_from_plans(arch_plan["network_class_name"], arch_plan["arch_kwargs"],
                                   arch_plan["_kw_requires_import"], 1, 3, allow_init=True,
                                   deep_supervision=None if arch == "PrimusTiny" else False)
    assert set(weights) == set(plain.state_dict())  # a plain network: no lora_A / base_layer keys
    # nnU-Net's predictor on the folder, with peft unimportable, gives the stored predictions
    monkeypatch.setitem(sys.modules, "peft", None)
    test_cases = [c for c in lesion_set["data"].cases if c.case_id in lesion_set["split"]["test"]][:1]
    with nndata.environment(None, None, out / "nnunet", 1):
        again = nnrun.predict(model, fold, test_cases, tmp_path / "again", torch.device("cpu"), 1.0)
    import nibabel as nib

    for case in test_cases:
        ours = np.asarray(nib.load(str(out / "predictions" / f"{case.case_id}.nii.gz")).dataobj)
        assert np.array_equal(ours, np.asarray(nib.load(str(again[case.case_id])).dataobj)), case.case_id


def test_a_killed_lora_run_resumes_with_its_adapters(lesion_set, tmp_path, monkeypatch):
    """nnU-Net's checkpoint_latest.pth of a lora run holds the adapters unmerged; the job run again
    attaches them before loading it, trains the last epoch and merges."""
    pytest.importorskip("peft")
    ckpt = tmp_path / "ckpt.pt"
    pretrained_checkpoint(ckpt, "PrimusTiny")
    run = "mae__PrimusTiny__demo__lora__2"
    options = {"nnunet": {"val_iterations_per_epoch": 1, "save_every": 1}}
    real_end = nnUNetTrainer_OpenMind.on_epoch_end

    def killed_after_epoch_1(self):
        real_end(self)
        if self.current_epoch == 1:
            raise _Killed

    monkeypatch.setattr(nnUNetTrainer_OpenMind, "on_epoch_end", killed_after_epoch_1)
    s = settings_for(lesion_set, run, ckpt, **options)
    with pytest.raises(_Killed):
        nnrun.finetune_segmentation(s, threads=1)
    fold_dir = nnrun.model_folder(Path(s.out_dir) / "nnunet", lesion_set["prepared"]["dataset_name"]) / \
        f"fold_{nndata.nnunet_fold(lesion_set['split'], 'test')}"
    latest = torch.load(fold_dir / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert any(".lora_A." in k for k in latest["network_weights"])
    monkeypatch.setattr(nnUNetTrainer_OpenMind, "on_epoch_end", real_end)
    assert nnrun.finetune_segmentation(settings_for(lesion_set, run, ckpt, **options), threads=1) == "finished"
    final = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2 and not any("lora" in k or "base_layer" in k for k in final["network_weights"])
