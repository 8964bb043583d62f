"""Fine-tune one segmentation run inside nnU-Net v2 and score its predictions (the job's entry).

`finetune_segmentation(settings, threads)` does, for one dataset x run x fold:

1. `dataset.prepare`: raw export, fingerprint, preprocessing at the pre-training spacing and
   `splits_final.json` (once per dataset, shared by its runs);
2. plans like nnssl (`plans.like_nnssl`) with this run's table in their `openmind_bench` section;
3. `nnUNetTrainer_OpenMind` trains into the nnU-Net model folder
   `{out}/nnunet/DatasetNNN_{name}/nnUNetTrainer_OpenMind__OpenMindPlans__3d_fullres/fold_{i}`
   (resumes from its `checkpoint_latest.pth`; skips training when `checkpoint_final.pth` exists);
4. nnU-Net's predictor (sliding window, Gaussian weighting, mirroring on all axes) writes the
   evaluation cases' label maps to `{out}/predictions/`;
5. our per-case DSC / NSD (`openmind_bench.metrics`) on them -> `{out}/metrics.json` + `metrics.csv`,
   with the trainer's count of what it trained (`trained_parameters`).

nnU-Net's path variables and `nnUNet_n_proc_DA` (from the job's threads, >= 1) are set here for
the job; `nnUNet_extTrainer` is set too, so any nnU-Net command started from the job finds the trainer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from openmind_bench.downstream import lora, schedules, splits
from openmind_bench.names import METRICS_FILE
from openmind_bench.downstream.nnunet import dataset as nndata
from openmind_bench.downstream.nnunet import plans as nnplans

log = logging.getLogger(__name__)

TRAINER = "nnUNetTrainer_OpenMind"
CHECKPOINT = "checkpoint_final.pth"
# nnU-Net's fine-tuning trainers' optimisers (pretrainedTrainer / Primus trainers)
OPTIMIZER = {"cnn": {"name": "sgd", "momentum": 0.99, "weight_decay": 3e-5},
             "transformer": {"name": "adamw", "betas": [0.9, 0.98], "weight_decay": 5e-2}}
GRAD_CLIP = {"cnn": 12.0, "transformer": 1.0}
# What a segmentation run leaves in its folder (kept only for a run with the same record).
SEGMENTATION_STATE = ("nnunet", "predictions", METRICS_FILE, "metrics.csv", "compute.json")


def ext_trainer_path() -> str:
    """The folder `nnUNet_extTrainer` must list for nnU-Net to find `nnUNetTrainer_OpenMind`."""
    return str(Path(__file__).resolve().parent / "ext_trainers")


def model_folder(results: str | Path, dataset_name: str) -> Path:
    return Path(results) / dataset_name / f"{TRAINER}__{nnplans.PLANS_NAME}__{nnplans.CONFIGURATION}"


def run_schedule(name, family: str, epochs: int, iterations: int, schedule_config: dict) -> schedules.Schedule:
    """The run's schedule table: its named schedule when pre-trained; from scratch nnU-Net's own
    (poly for CNNs, the Primus trainers' linear warm-up then poly for Primus)."""
    cfg = schedule_config or {}
    if name.pretrained:
        schedule_name = name.schedule or "default"
    else:
        schedule_name = "warmup" if family == "transformer" else "default"
    return schedules.configured_schedule(schedule_name, family, epochs,
                                         schedules.peak_lr(family, name.pretrained, cfg.get("peak_lr")), iterations, cfg)


def build_plans(settings, name, spec, default_plans: dict, train_ids: list, val_ids: list) -> dict:
    from openmind_bench.downstream import transfer
    from openmind_bench.downstream.settings import checkpoint_architecture

    options = dict(settings.nnunet or {})
    pretrained = _pretrained_or_none(settings, name)
    patch = transfer.finetuning_patch(settings.patch_size, settings.scratch_patch_size, pretrained)
    entry, family = nnplans.architecture(pretrained.plan if pretrained else None,
                                         name.architecture or checkpoint_architecture(settings),
                                         settings.architecture_presets, patch)
    schedule = run_schedule(name, family, name.epochs, settings.steps_per_epoch, settings.schedule_config)
    run = {
        "run": settings.run, "dataset": spec.name, "fold": str(settings.fold), "family": family,
        "checkpoint": str(Path(settings.checkpoint).resolve()) if name.pretrained else None,
        "schedule": schedule.to_dict(), "optimizer": dict(OPTIMIZER[family]), "grad_clip": GRAD_CLIP[family],
        "val_iterations_per_epoch": int(options.get("val_iterations_per_epoch", 50)),
        "save_every": int(options.get("save_every", 50)),
        "decoder_stage": options.get("decoder_stage", "published"),
        "train_cases": list(train_ids), "val_cases": list(val_ids),
    }
    if lora.uses_lora(schedule.name):
        run["lora"] = dict(settings.schedule_config["lora"])
    return nnplans.like_nnssl(default_plans, spacing=spacing_of(settings, pretrained), patch_size=patch,
                              batch_size=settings.batch_size, architecture_entry=entry,
                              channels=len(spec.modalities), run=run)


def spacing_of(settings, pretrained=None) -> list[float]:
    """The fine-tuning spacing: config `finetune.spacing`, else the checkpoint's pre-training spacing, else 1 mm."""
    if settings.spacing:
        return [float(s) for s in settings.spacing]
    if pretrained is not None and pretrained.spacing:
        return list(pretrained.spacing)
    return [1.0, 1.0, 1.0]


def device_for(threads: int):
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(max(1, int(threads)))
    return torch.device("cpu")


def _inference_settings(settings) -> dict:
    """The evaluation's own settings, which the run record leaves out (they shape no model)."""
    return {"sliding_window_overlap": float(settings.sliding_window_overlap),
            "test_time_mirroring": bool(settings.test_time_mirroring)}


def predict(model_dir: str | Path, fold: int, cases: list, out_dir: str | Path, device, tile_step_size: float = 0.5,
            mirroring: bool = True, inputs: list | None = None) -> dict[str, Path]:
    """nnU-Net's predictor on `cases` (readers.Case; `inputs`: each case's files in the model's
    channel order, default its images); returns case id -> prediction file."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(fold,), checkpoint_name=CHECKPOINT)
    ending = predictor.dataset_json["file_ending"]
    inputs = [c.images for c in cases] if inputs is None else inputs
    predictor.predict_from_files_sequential([[str(p) for p in files] for files in inputs],
                                            [str(out_dir / c.case_id) for c in cases], save_probabilities=False,
                                            overwrite=True)
    return {c.case_id: out_dir / f"{c.case_id}{ending}" for c in cases}


def score(spec, cases: list, predictions: dict, identity) -> dict:
    from openmind_bench.metrics import evaluate_case_files, segmentation_document

    scored = {}
    for case in cases:
        scored[case.case_id] = evaluate_case_files(case.label, predictions[case.case_id], spec.labels,
                                                   float(spec.nsd_tolerance_mm))
        log.info("%s: DSC %.3f NSD %.3f", case.case_id, scored[case.case_id]["DSC"], scored[case.case_id]["NSD"])
    return segmentation_document(identity, scored, float(spec.nsd_tolerance_mm))


def finetune_segmentation(settings, threads: int = 1) -> str:
    """Train, predict, score into `settings.out_dir` (module doc); returns "finished".

    The nnU-Net model folder an earlier job left is used only when that job's record
    (`engine.record`: training settings, sha256 of the pre-trained checkpoint, split and low-data
    subset) equals this one's: then a finished model is predicted and scored again with this job's
    evaluation settings, and an unfinished one continues from its checkpoint_latest.pth
    (preemption). Otherwise it is removed and the run trains anew."""
    from openmind_bench.downstream import inference
    from openmind_bench.downstream.readers import read_dataset, restricted_to
    from openmind_bench.downstream.settings import run_record
    from openmind_bench.engine.record import prepare_run_dir
    from openmind_bench.engine.step import seed_global_rngs
    from openmind_bench.names import parse_run
    from openmind_bench.registry import load_registry

    out = Path(settings.out_dir)
    name = parse_run(settings.run)
    registry = load_registry(settings.registry, settings.root)
    spec = registry.get(settings.dataset)
    if spec.zero_shot_from:
        return zero_shot(settings, registry, threads)
    if name.pretrained and not settings.checkpoint:
        raise ValueError(f"run {name} is pre-trained but no checkpoint was given")
    record = run_record(settings)
    prepare_run_dir(out, record, SEGMENTATION_STATE, label=f"fine-tuning {out}")
    split = splits.read_split(settings.split)
    # nnU-Net sees the split's cases only: a case the split rule rejected (say, an undeclared label
    # value, recorded in results/qc/rejected.tsv) would fail its dataset integrity check. The files
    # are not streamed again: training_cases checks them against the split's record of the checked ones
    data = restricted_to(read_dataset(spec, verify_files=False), splits.all_cases(split))
    train_cases, eval_cases = splits.training_cases(settings, data, name)
    threads = max(1, int(threads or settings.threads or 1))
    device = device_for(threads)
    ledger = compute_ledger(settings, name, device)
    prepared = nndata.prepare(data, split, out.parent.parent / nndata.DATA_DIR,
                              spacing=spacing_of(settings, _pretrained_or_none(settings, name)), n_proc=threads)
    train_ids = [c.case_id for c in train_cases]
    _, val_ids = splits.partition(split, settings.fold)
    plans = build_plans(settings, name, spec, prepared["default_plans"], train_ids, val_ids)
    fold = nndata.nnunet_fold(split, settings.fold)
    results = out / "nnunet"
    folder = model_folder(results, prepared["dataset_name"])
    dataset_json = _json(Path(prepared["raw"]) / prepared["dataset_name"] / "dataset.json")
    os.environ["nnUNet_extTrainer"] = _path_list(os.environ.get("nnUNet_extTrainer"), ext_trainer_path())
    with nndata.environment(prepared["raw"], prepared["preprocessed"], results, threads):
        from openmind_bench.downstream.nnunet.trainer import TRAINED_PARAMETERS, nnUNetTrainer_OpenMind

        fold_dir = folder / f"fold_{fold}"
        reused = (fold_dir / CHECKPOINT).exists()
        if reused:
            log.info("reusing the trained model %s: its run's training settings and inputs equal this job's "
                     "(record digest %s); predicting and scoring again", fold_dir / CHECKPOINT, record.digest[:12])
        else:
            resume = (fold_dir / "checkpoint_latest.pth").exists()
            # the run's seed: the new decoder's initialisation and nnU-Net's main-process draws
            # (its background augmentation workers are not deterministic)
            seed_global_rngs(settings.seed)
            trainer = nnUNetTrainer_OpenMind({**plans, "continue_training": resume}, nnplans.CONFIGURATION, fold,
                                             dataset_json, device)
            trainer.compute_ledger = ledger.with_workload(**_workload(plans, name, settings))
            if resume:
                trainer.load_checkpoint(str(fold_dir / "checkpoint_latest.pth"))
            trainer.run_training()
            del trainer
        predictions = predict(folder, fold, eval_cases, out / "predictions", device,
                              1.0 - float(settings.sliding_window_overlap), bool(settings.test_time_mirroring))
    doc = score(spec, eval_cases, predictions, inference.identity(spec.name, name, settings.fold,
                                                                            settings.external_checkpoint))
    doc.update(engine="nnunetv2", run_record=record.summary(), training_reused=reused,
               inference=_inference_settings(settings))
    trained = fold_dir / TRAINED_PARAMETERS
    if trained.is_file():  # written by the trainer (models of earlier versions have none)
        doc["trained_parameters"] = _json(trained)
    inference.write(doc, out)
    ledger.finish("finished")
    return "finished"


def compute_ledger(settings, name, device):
    """The job's compute ledger (engine.ledger): one process; nnU-Net autocasts to float16 on CUDA."""
    from openmind_bench.engine.distributed import Context
    from openmind_bench.engine.ledger import ComputeLedger, precision_of

    return ComputeLedger(settings.out_dir, Context(0, 1, 0, device), stage="finetune_segmentation",
                         run=settings.run, precision=precision_of(True, "float16", device))


def _workload(plans: dict, name, settings) -> dict:
    from openmind_bench.downstream.settings import checkpoint_architecture

    conf = plans["configurations"][nnplans.CONFIGURATION]
    return {"task": "seg", "architecture": name.architecture or checkpoint_architecture(settings),
            "patch_size": list(conf["patch_size"]), "batch_size": int(conf["batch_size"])}


def source_run_dir(out_dir: str | Path, source: str) -> Path:
    """`results/downstream/{source}/{run}/fold_test` for `results/downstream/{dataset}/{run}/fold_{k}`."""
    out = Path(out_dir)
    return out.parents[2] / source / out.parent.name / "fold_test"


def zero_shot(settings, registry, threads: int = 1) -> str:
    """Score the model the same run fine-tuned on `zero_shot_from` (its fixed train split, fold
    `test`) on this dataset's test cases, untrained here (the MAE paper's BraTS-Mets rows)."""
    from openmind_bench.downstream import inference
    from openmind_bench.downstream.readers import read_dataset
    from openmind_bench.names import parse_run

    spec = registry.get(settings.dataset)
    source = registry.get(spec.zero_shot_from)
    if str(settings.fold) != "test":
        raise ValueError(f"dataset {spec.name} is scored zero-shot from {source.name}: only fold 'test' exists, "
                         f"not {settings.fold!r}")
    source_dir = source_run_dir(settings.out_dir, source.name)
    model = model_folder(source_dir / "nnunet", nndata.dataset_name(source))
    source_split = splits.read_split(Path(settings.split).parent / f"{source.name}.json")
    fold = nndata.nnunet_fold(source_split, "test")
    if not (model / f"fold_{fold}" / CHECKPOINT).exists():
        raise FileNotFoundError(f"zero-shot {spec.name} <- {source.name}: no fine-tuned model at {model}/fold_{fold}")
    channels = len(_json(model / "dataset.json")["channel_names"])
    if channels != len(spec.zero_shot_inputs):
        raise ValueError(f"zero-shot {spec.name} <- {source.name}: the model takes {channels} channel(s), "
                         f"{spec.name} gives {len(spec.zero_shot_inputs)} ({list(spec.zero_shot_inputs)}; "
                         "registry field zero_shot_channels)")
    data = read_dataset(spec, verify_files=False)
    split = splits.read_split(settings.split)
    _, test_ids = splits.partition(split, "test")
    splits.check_case_files(split, settings.split, spec.source, test_ids)
    by_id = {c.case_id: c for c in data.cases}
    cases = [by_id[c] for c in test_ids if c in by_id]
    inputs = [spec.zero_shot_images(c.images) for c in cases]  # the source model's channel order
    threads = max(1, int(threads or 1))
    out = Path(settings.out_dir)
    os.environ["nnUNet_extTrainer"] = _path_list(os.environ.get("nnUNet_extTrainer"), ext_trainer_path())
    with nndata.environment(None, None, source_dir / "nnunet", threads):
        predictions = predict(model, fold, cases, out / "predictions", device_for(threads),
                              1.0 - float(settings.sliding_window_overlap), bool(settings.test_time_mirroring),
                              inputs=inputs)
    doc = score(spec, cases, predictions, inference.identity(spec.name, parse_run(settings.run), settings.fold,
                                                                     settings.external_checkpoint))
    doc.update(engine="nnunetv2", zero_shot_from=source.name, zero_shot_channels=list(spec.zero_shot_inputs),
               inference=_inference_settings(settings))
    inference.write(doc, out)
    return "finished"


def _pretrained_or_none(settings, name):
    from openmind_bench.downstream import transfer
    from openmind_bench.downstream.settings import checkpoint_architecture

    return transfer.read_pretrained(settings.checkpoint, checkpoint_architecture(settings)) if name.pretrained else None


def _json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def _path_list(existing: str | None, folder: str) -> str:
    parts = [p for p in (existing or "").split(os.pathsep) if p]
    return os.pathsep.join(parts if folder in parts else [*parts, folder])
