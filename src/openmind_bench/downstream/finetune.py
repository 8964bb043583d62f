"""Fine-tune one pre-trained checkpoint (or a from-scratch network) on one downstream dataset and fold.

The loop runs on the shared engine (`engine.step.train_step`: one collective for the non-finite
loss and stop flags, clipping, AMP; `engine.distributed` under torchrun; `engine.optimisation`'s
optimisers; `engine.logger.RunLogger`; atomic checkpoints with resume and SIGTERM/SIGUSR1 handling).
What is specific to fine-tuning:

- the network: the checkpoint's architecture rebuilt for the fine-tuning patch and channels, encoder
  and stem transferred (`downstream.transfer`), decoder new; classification: the pooled encoder and a
  linear head;
- the schedule (`downstream.schedules`): per-step lr of the `stem` / `encoder` / `decoder` groups and
  which of them train; frozen groups get `requires_grad=False` and no optimiser slot, so they stay
  bit-identical, and the optimiser is rebuilt at each phase change (as the public staged trainers do);
- segmentation: Dice + CE (MONAI `DiceCELoss`), nnU-Net-like MONAI augmentation, Gaussian
  sliding-window inference; classification: label-smoothed CE, AdamW (1e-4, wd 1e-2);
- output: per-case metrics (`metrics.json` + `metrics.csv`) in the aggregation shape, predictions,
  the fine-tuned weights (`checkpoint_final.pt`, for zero-shot evaluation) and `progress.csv`.

Run names: `{method}__{arch}__{selection}__{schedule}__{epochs}` or `scratch__{arch}__{epochs}`, with
`__n{N}` appended for low-data runs (N training cases).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from openmind_bench import atomic, nets
from openmind_bench.downstream import inference, schedules, splits, transfer, volumes
from openmind_bench.downstream.settings import FinetuneSettings
from openmind_bench.downstream.readers import read_dataset
from openmind_bench.engine import checkpoint, distributed, optimisation
from openmind_bench.engine.checkpoint import PREEMPTED
from openmind_bench.engine.logger import RunLogger
from openmind_bench.engine.step import StopRequest, autocast, derive_seed, grad_scaler as make_grad_scaler, train_step
from openmind_bench.names import CNN, TRANSFORMER, RunName, parse_run
from openmind_bench.registry import load_registry

log = logging.getLogger(__name__)

# The fine-tuned weights use the engine's checkpoint file names.
LATEST, FINAL = checkpoint.LATEST, checkpoint.FINAL
_TAG_INIT, _TAG_SAMPLE, _TAG_CASE = 11, 12, 13

# Classification (docs/architecture.md / the MAE paper's classification protocol).
CLASSIFICATION_OPTIMISER = {"optimizer": "adamw", "betas": [0.9, 0.999], "weight_decay": 1.0e-2, "grad_clip": 1.0}
CLASSIFICATION_PEAK_LR = 1.0e-4


class PooledEncoderClassifier(nn.Module):
    """The backbone's encoder, global average pooling of its deepest features, a linear head."""

    def __init__(self, backbone: nn.Module, n_classes: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(float(dropout))
        if hasattr(backbone, "eva"):
            width = backbone.eva.embed_dim if hasattr(backbone.eva, "embed_dim") else backbone.eva.num_features
        else:
            width = backbone.encoder.output_channels[-1]
        self.head = nn.Linear(int(width), n_classes)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        if hasattr(self.backbone, "eva"):
            from openmind_bench.nets.primus import embed_tokens, run_eva

            return run_eva(self.backbone.eva, embed_tokens(self.backbone, image)).mean(dim=1)
        return self.backbone.encoder(image)[-1].mean(dim=(2, 3, 4))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(image)))


class Objective(nn.Module):
    """model(view) -> loss, the interface `train_step` expects."""

    def __init__(self, net: nn.Module, task: str, label_smoothing: float):
        super().__init__()
        self.net = net
        if task == "seg":
            from monai.losses import DiceCELoss

            self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        else:
            self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, view: dict) -> torch.Tensor:
        return self.loss(self.net(view["image"]), view["target"])


def output_channels(spec) -> int:
    if spec.task == "cls":
        return len(spec.labels)
    regions = [k for k, v in spec.labels.items() if not isinstance(v, int)]
    if regions:
        raise ValueError(f"dataset {spec.name}: region labels {regions} need region-based training, which the "
                         "fine-tuning engine does not implement (softmax over integer labels only)")
    return max(int(v) for v in spec.labels.values()) + 1


def _prefixed(keys: dict, prefix: str) -> dict:
    return {k: (f"{prefix}{v}" if isinstance(v, str) else [f"{prefix}{x}" for x in v] if isinstance(v, list) else v)
            for k, v in keys.items()}


def build_model(settings: FinetuneSettings, spec, name: RunName):
    """(network, schedule groups' keys, patch size, transferred keys)."""
    pretrained = transfer.read_pretrained(settings.checkpoint) if name.pretrained else None
    architecture = None
    if pretrained is None or not pretrained.plan:
        architecture = nets.resolve(name.architecture, settings.architecture_presets)
    patch = transfer.finetuning_patch(settings.patch_size, settings.scratch_patch_size, pretrained)
    backbone = transfer.build_network(pretrained, architecture, patch, spec.channels,
                                      output_channels(spec) if spec.task == "seg" else 1)
    keys = dict(pretrained.keys) if pretrained is not None and pretrained.keys else nets.adaptation_keys(backbone)
    loaded = transfer.transfer(pretrained, backbone, patch) if pretrained is not None else []
    if spec.task == "cls":
        return (PooledEncoderClassifier(backbone, len(spec.labels), settings.head_dropout),
                _prefixed(keys, "backbone."), patch, loaded)
    return backbone, keys, patch, loaded


def family_of(net: nn.Module) -> str:
    backbone = getattr(net, "backbone", net)
    return TRANSFORMER if hasattr(backbone, "eva") else CNN


def build_schedule(settings: FinetuneSettings, name: RunName, family: str, task: str) -> schedules.Schedule:
    schedule = name.schedule or "default"
    cfg = settings.schedule_config
    if task == "cls":
        peak = CLASSIFICATION_PEAK_LR
    else:
        peak = schedules.peak_lr(family, name.pretrained, cfg["peak_lr"])
    if task == "cls" and schedule == "default":
        schedule = "cosine"  # the classification protocol: cosine annealing from the peak
    return schedules.configured_schedule(schedule, family, name.epochs, peak, settings.steps_per_epoch, cfg)


def optimiser_config(settings: FinetuneSettings, family: str, task: str) -> dict:
    if task == "cls":
        return dict(CLASSIFICATION_OPTIMISER)
    return dict(settings.optimisation[family])


def apply_phase(net: nn.Module, groups: dict, trainable: frozenset, cfg: dict, device) -> torch.optim.Optimizer:
    """Freeze what the phase freezes and build the optimiser over what trains (one torch param group
    per schedule group, named, so `set_learning_rates` can address it)."""
    param_groups = []
    for group, named in groups.items():
        train = group in trainable
        for _, p in named:
            p.requires_grad_(train)
        if train and named:
            param_groups.append({"params": [p for _, p in named], "name": group})
    return optimisation.OPTIMIZERS[cfg["optimizer"]](param_groups, {**cfg, "lr": 0.0}, device)


def set_learning_rates(optimizer: torch.optim.Optimizer, schedule: schedules.Schedule, step: int) -> dict:
    lrs = schedule.lrs(step)
    for group in optimizer.param_groups:
        group["lr"] = lrs[group["name"]]
    return lrs


def _save(path: Path, net: nn.Module, optimizer, epochs_done: int, settings: FinetuneSettings, history: list,
          schedule: schedules.Schedule, patch: list, spec, phase: str | None = None) -> None:
    state = {"phase": phase, "network_weights": net.state_dict(),
             "optimizer_state": optimizer.state_dict() if optimizer else None,
             "current_epoch": int(epochs_done), "settings": settings.to_dict(), "history": list(history),
             "schedule": schedule.to_dict(), "patch_size": list(patch), "task": spec.task,
             "input_channels": spec.channels}
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)


def training_cases(settings: FinetuneSettings, data, name: RunName) -> tuple[list, list]:
    from openmind_bench.downstream.readers import case_table

    split = splits.read_split(settings.split)
    train_ids, eval_ids = splits.partition(split, settings.fold)
    if name.low_data_n:
        if not settings.low_data_subset:
            raise ValueError(f"run {name}: a low-data run needs low_data_subset (the subset file)")
        subset = splits.ensure_low_data_subset(settings.low_data_subset, case_table(data), split, name.low_data_n,
                                               seed=settings.seed,
                                               settings=splits.SplitSettings(**settings.split_settings))
        train_ids = [c for c in train_ids if c in set(subset["train"])]
    by_id = {c.case_id: c for c in data.cases}
    missing = [c for c in [*train_ids, *eval_ids] if c not in by_id]
    if missing:
        raise ValueError(f"split {settings.split} names cases dataset {data.name} no longer has: {missing[:3]}")
    return [by_id[c] for c in train_ids], [by_id[c] for c in eval_ids]


def run(settings: FinetuneSettings) -> str:
    """Fine-tune and evaluate into `settings.out_dir`; returns "finished" or "preempted"."""
    ctx = distributed.init()
    try:
        return _run(settings, ctx)
    finally:
        distributed.shutdown()


def _run(settings: FinetuneSettings, ctx: distributed.Context) -> str:
    out = Path(settings.out_dir)
    if ctx.device.type == "cpu" and settings.threads > 0:
        torch.set_num_threads(settings.threads)
    name = parse_run(settings.run)
    if name.pretrained and not settings.checkpoint:
        raise ValueError(f"run {name} is pre-trained but no checkpoint was given")
    spec = load_registry(settings.registry, settings.root).get(settings.dataset)
    data = read_dataset(spec)
    train_cases, eval_cases = training_cases(settings, data, name)
    if settings.batch_size % ctx.world_size:
        raise ValueError(f"batch_size {settings.batch_size} is not divisible by {ctx.world_size} processes")
    local_batch = settings.batch_size // ctx.world_size

    torch.manual_seed(derive_seed(settings.seed, _TAG_INIT))  # the same new decoder on every rank
    net, keys, patch, loaded = build_model(settings, spec, name)
    net = net.to(ctx.device)
    family = family_of(net)
    groups = transfer.parameter_groups(net, keys)
    schedule = build_schedule(settings, name, family, spec.task)
    opt_cfg = optimiser_config(settings, family, spec.task)
    grad_clip = float(opt_cfg.get("grad_clip", math.inf))
    objective = Objective(net, spec.task, settings.label_smoothing).to(ctx.device)
    if ctx.is_main:
        settings.write(out / "settings.json")
        atomic.write_json(out / "schedule.json", {**schedule.to_dict(), "patch_size": patch,
                                                  "transferred_tensors": len(loaded), "family": family})
    log.info("dataset %s fold %s run %s: %d training / %d evaluation cases, patch %s, %s schedule",
             spec.name, settings.fold, name, len(train_cases), len(eval_cases), patch, schedule.name)

    # Preprocessed training cases stay in memory (one z-scored float32 copy per case).
    train_volumes = [volumes.load_case(c, settings.spacing) for c in train_cases]
    augment = (volumes.segmentation_augmentation(patch) if spec.task == "seg"
               else volumes.classification_augmentation(patch))

    start_epoch, history = 0, []
    latest = out / LATEST
    saved = None
    if latest.exists():
        saved = torch.load(latest, map_location=ctx.device, weights_only=True)
        net.load_state_dict(saved["network_weights"])
        start_epoch, history = int(saved["current_epoch"]), list(saved["history"])
        log.info("resuming %s at epoch %d", latest, start_epoch)
    logger = RunLogger(out, enabled=ctx.is_main, history=history,
                       global_step=start_epoch * settings.steps_per_epoch)
    amp_context = autocast(settings.amp, settings.amp_dtype, ctx.device)
    grad_scaler = make_grad_scaler(settings.amp, settings.amp_dtype, ctx.device)
    phase, optimizer, model = None, None, objective

    with StopRequest() as stop:
        for epoch in range(start_epoch, name.epochs):
            started = time.time()
            sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
            for step_in_epoch in range(settings.steps_per_epoch):
                step = epoch * settings.steps_per_epoch + step_in_epoch
                current = schedule.phase_at(step)[0]
                if current is not phase:
                    phase = current
                    optimizer = apply_phase(net, groups, phase.trainable, opt_cfg, ctx.device)
                    # the saved optimiser state continues only the phase it was saved in
                    if saved is not None and saved.get("optimizer_state") and saved.get("phase") == phase.name:
                        optimizer.load_state_dict(saved["optimizer_state"])
                    model = objective
                    if ctx.distributed:
                        model = DistributedDataParallel(
                            objective, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                            find_unused_parameters=True)
                    log.info("epoch %d: phase %s, training %s", epoch + 1, phase.name, sorted(phase.trainable))
                lrs = set_learning_rates(optimizer, schedule, step)
                samples = []
                for i in range(local_batch):
                    seed = derive_seed(settings.seed, _TAG_SAMPLE, epoch, step_in_epoch, ctx.rank * local_batch + i)
                    volume = train_volumes[np.random.default_rng(seed).integers(len(train_volumes))]
                    samples.append({**volumes.augmented_sample(augment, volume, seed), "target": volume.target})
                image = torch.stack([s["image"] for s in samples]).float().to(ctx.device)
                if spec.task == "seg":
                    target = torch.stack([s["label"] for s in samples]).long().to(ctx.device)
                else:
                    target = torch.tensor([int(s["target"]) for s in samples], device=ctx.device)
                view = {"image": image, "target": target}
                loss, stop_now = train_step(model, view, optimizer, grad_scaler, grad_clip, amp_context, ctx, stop)
                sums += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=loss.device)])
                if stop_now:
                    return _preempted(out, net, optimizer, epoch, settings, logger, schedule, patch, spec, ctx,
                                      phase.name)
            distributed.all_reduce_sum(sums, ctx)
            seconds = time.time() - started
            n_samples = settings.steps_per_epoch * settings.batch_size
            logger.epoch({"epoch": epoch + 1, "train_loss": float(sums[0] / sums[1]), "val_loss": math.nan,
                          "lr": max(lrs.values()), "epoch_seconds": round(seconds, 3),
                          "samples_per_second": round(n_samples / max(seconds, 1e-9), 3)})
            if ctx.is_main:
                log.info("epoch %d/%d: loss %.4f, lr %s, %.1f s", epoch + 1, name.epochs, float(sums[0] / sums[1]),
                         {k: f"{v:.3g}" for k, v in lrs.items()}, seconds)
                if epoch + 1 < name.epochs:
                    _save(latest, net, optimizer, epoch + 1, settings, logger.history, schedule, patch, spec,
                          phase.name)
            distributed.barrier(ctx)
            saved = None

    if ctx.is_main:
        if settings.keep_checkpoint:
            _save(out / FINAL, net, None, name.epochs, settings, logger.history, schedule, patch, spec)
        doc = inference.evaluate(net, spec, eval_cases, inference.identity(spec.name, name, settings.fold),
                                 patch, settings.spacing, ctx.device, out, settings.sliding_window_overlap,
                                 settings.save_predictions)
        inference.write(doc, out)
        latest.unlink(missing_ok=True)
        (out / PREEMPTED).unlink(missing_ok=True)
    # No barrier after the evaluation: the other ranks may exit while rank 0 scores the test set
    # (which can outlast a collective's timeout on large datasets).
    logger.close()
    return "finished"


def _preempted(out, net, optimizer, epoch, settings, logger, schedule, patch, spec, ctx, phase) -> str:
    # Mid-epoch stops restart the epoch: fine-tuning epochs are short next to a job's lifetime.
    if ctx.is_main:
        _save(out / LATEST, net, optimizer, epoch, settings, logger.history, schedule, patch, spec, phase)
        atomic.write_json(out / PREEMPTED, {"epoch": epoch, "time": time.time()})
    distributed.barrier(ctx)
    logger.close()
    return "preempted"
