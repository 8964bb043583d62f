"""Classification fine-tuning: one pre-trained checkpoint (or a from-scratch network) on one
classification dataset and fold. (Segmentation fine-tunes inside nnU-Net v2: `downstream.nnunet`.)

The classification protocol of the benchmark (SSL3D_classification @848e22e, the papers'
classification code base; values in config `downstream.classification` / `finetune`): the
checkpoint's encoder, mean pooling of its last stage, dropout 0.2 and a linear head; AdamW 1e-4,
weight decay 1e-2; label-smoothed (0.2) cross-entropy; 200 epochs, the first 20 a linear warm-start
(lr * (e + 1) / 21), then cosine annealing from the peak; batch 2 with the gradients of 48
micro-batches accumulated per optimiser step (effective batch 96; its ABIDE data config, which its
README's example of 1 x 48 over 400 epochs differs from); an epoch is one pass over the training
cases in a seeded random order (the last step of a pass may accumulate fewer); nnU-Net-style
augmentation ending in a centre crop (`volumes.classification_augmentation`); fp16 autocast with a
grad scaler on GPUs; the centre crop at test time.

On several processes the effective batch stays the protocol's: each optimiser step's micro-batches
are dealt out over the ranks (every world-th one from the rank's own index; a rank left without one
runs the step's first with its loss weighted 0, since DDP needs every rank's backward), and the
losses are divided by the step's micro-batch count over the world size, so DDP's mean over the
ranks is the gradient of the whole step. Every random draw is a function of the run seed and the
place in the run (epoch, step, micro-batch, sample): the augmentation, and the dropout / stochastic
depth masks (drawn in a generator seeded per micro-batch), so ranks draw different masks and a
preempted run resumed at its step continues exactly (the checkpoint holds the step inside the
epoch, the partial loss sums and the GradScaler). The training cases are preprocessed once into the
run folder (`cases/`, the ranks sharing the work) and memory-mapped: the ranks of a node share one
copy in the page cache rather than each holding every case.

The loop runs on the shared engine (`engine.step.train_step` with micro-batches: one collective for
the non-finite loss and stop flags, clipping, AMP; `engine.distributed` under torchrun;
`engine.logger.RunLogger`; atomic checkpoints with resume and SIGTERM/SIGUSR1 handling). Every
schedule comes from `downstream.schedules` (the protocol's is `cosine`; `frozen`, `warmup`, ... as
named): per-epoch lr of the `stem` / `encoder` / `decoder` (= head) groups and which of them train;
frozen groups get `requires_grad=False`, so they stay bit-identical; the optimiser is kept across a
phase change (groups that start training added) unless the phase starts a new one
(`fresh_optimizer`), as in the segmentation trainer (the protocol's warm-start and cosine share one
optimiser, as its single AdamW under a Lightning scheduler).

The `lora` schedule (`downstream.lora`) attaches low-rank adapters to the backbone's encoder after
the checkpoint is loaded and trains them with stem and head; the adapters are merged into the
weights before the evaluation and before `checkpoint_final.pt` is written (a plain network).

Output: per-case probabilities and balanced accuracy / AUROC (`metrics.json` + `metrics.csv`) in
the aggregation shape, the fine-tuned weights (`checkpoint_final.pt`) and `progress.csv`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from openmind_bench import atomic, nets
from openmind_bench.downstream import inference, lora, schedules, splits, transfer, volumes
from openmind_bench.downstream.settings import FinetuneSettings, checkpoint_architecture
from openmind_bench.downstream.readers import Case, read_dataset
from openmind_bench.engine import checkpoint, distributed, optimisation
from openmind_bench.engine.checkpoint import PREEMPTED
from openmind_bench.engine.ledger import ComputeLedger, precision_of
from openmind_bench.engine.logger import RunLogger
from openmind_bench.engine.record import RunRecord
from openmind_bench.engine.step import StopRequest, autocast, derive_seed, grad_scaler as make_grad_scaler, train_step
from openmind_bench.names import CNN, TRANSFORMER, RunName, parse_run
from openmind_bench.registry import load_registry

log = logging.getLogger(__name__)

# The fine-tuned weights use the engine's checkpoint file names.
LATEST, FINAL = checkpoint.LATEST, checkpoint.FINAL
CASES = "cases"  # the preprocessed training cases, memory-mapped by every rank
_TAG_INIT, _TAG_SAMPLE, _TAG_ORDER, _TAG_DROPOUT = 11, 12, 14, 15


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
        from openmind_bench.downstream.probes import pooled_features  # the probes' features are the head's input

        return pooled_features(self.backbone, image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(image)))


class Objective(nn.Module):
    """model(view) -> label-smoothed cross-entropy, the interface `train_step` expects. A view's
    `seed` seeds the forward's random draws (dropout, stochastic depth) in a forked generator, the
    process's own left as it was; a `padding` view's loss is weighted 0."""

    def __init__(self, net: nn.Module, label_smoothing: float):
        super().__init__()
        self.net = net
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, view: dict) -> torch.Tensor:
        image = view["image"]
        if "seed" in view:
            with torch.random.fork_rng(devices=[image.device] if image.device.type == "cuda" else []):
                torch.manual_seed(int(view["seed"]))
                loss = self.loss(self.net(image), view["target"])
        else:
            loss = self.loss(self.net(image), view["target"])
        return loss * 0.0 if view.get("padding") else loss


def _prefixed(keys: dict, prefix: str) -> dict:
    return {k: (f"{prefix}{v}" if isinstance(v, str) else [f"{prefix}{x}" for x in v] if isinstance(v, list) else v)
            for k, v in keys.items()}


def check_task(spec) -> None:
    if spec.task != "cls":
        raise ValueError(f"dataset {spec.name} is a {spec.task} dataset: segmentation fine-tunes inside nnU-Net "
                         "(openmind_bench.downstream.nnunet), this engine classifies")


def build_model(settings: FinetuneSettings, spec, name: RunName):
    """(classifier, schedule groups' keys, patch size, transferred keys)."""
    check_task(spec)
    planless = checkpoint_architecture(settings)
    pretrained = transfer.read_pretrained(settings.checkpoint, planless) if name.pretrained else None
    architecture = None
    if pretrained is None or not pretrained.plan:
        architecture = nets.resolve(name.architecture or planless, settings.architecture_presets)
    patch = transfer.finetuning_patch(settings.patch_size, settings.scratch_patch_size, pretrained)
    backbone = transfer.build_network(pretrained, architecture, patch, spec.channels, 1)
    keys = nets.adaptation_keys(backbone)  # the transfer renames the checkpoint's tensors to these
    loaded = transfer.transfer(pretrained, backbone, patch) if pretrained is not None else []
    return (PooledEncoderClassifier(backbone, len(spec.labels), settings.head_dropout),
            _prefixed(keys, "backbone."), patch, loaded)


def family_of(net: nn.Module) -> str:
    backbone = getattr(net, "backbone", net)
    return TRANSFORMER if hasattr(backbone, "eva") else CNN


def training_length(settings: FinetuneSettings, name: RunName) -> int:
    """Epochs a classification run trains: `downstream.classification.epochs` (the protocol's 400),
    or the run name's when that is null. The run keeps its name, so its rows sit beside the
    segmentation results of the same pre-training and schedule."""
    epochs = settings.classification.get("epochs")
    return int(name.epochs if epochs is None else epochs)


def epoch_plan(n_cases: int, batch_size: int, accumulation: int, steps_per_epoch: int | None,
               seed: int, epoch: int) -> list[list[list[int]]]:
    """Case indices of one epoch: optimiser steps -> micro-batches -> cases.

    `steps_per_epoch` None: one pass over the cases in a seeded random order, padded from its own
    start to whole micro-batches, cut into steps of `accumulation` micro-batches (the last may have
    fewer). Else that many full steps, the order continuing over further seeded passes."""
    if n_cases < 1:
        raise ValueError("classification fine-tuning needs at least one training case")

    def one_pass(index: int) -> list[int]:
        return [int(i) for i in np.random.default_rng(derive_seed(seed, _TAG_ORDER, epoch, index)).permutation(n_cases)]

    if steps_per_epoch is None:
        order = one_pass(0)
        n_samples = math.ceil(n_cases / batch_size) * batch_size
        order += [order[i % n_cases] for i in range(n_samples - n_cases)]
    else:
        n_samples = int(steps_per_epoch) * batch_size * accumulation
        order = []
        while len(order) < n_samples:
            order += one_pass(len(order) // n_cases)
        order = order[:n_samples]
    micro = [order[i:i + batch_size] for i in range(0, n_samples, batch_size)]
    return [micro[i:i + accumulation] for i in range(0, len(micro), accumulation)]


def build_schedule(settings: FinetuneSettings, name: RunName, family: str, epochs: int,
                   steps_per_epoch: int) -> schedules.Schedule:
    """The protocol's schedule (`cosine`: linear warm-start over `classification.warmup_epochs`, then
    cosine) for `default` and scratch runs; the named segmentation schedule otherwise."""
    schedule = name.schedule or "default"
    peak = float(settings.classification["peak_lr"])
    if schedule != "default":
        return schedules.configured_schedule(schedule, family, epochs, peak, steps_per_epoch, settings.schedule_config)
    warmup = int(settings.classification["warmup_epochs"])
    try:
        return schedules.build_schedule("cosine", epochs, peak, steps_per_epoch, whole_warmup=warmup)
    except schedules.ScheduleError as e:
        raise schedules.ScheduleError(f"config key 'downstream.classification.warmup_epochs' ({warmup}): {e}") from None


def optimiser_config(settings: FinetuneSettings) -> dict:
    cls = settings.classification
    return {"optimizer": "adamw", "betas": list(cls["betas"]), "weight_decay": float(cls["weight_decay"]),
            "grad_clip": cls["grad_clip"]}


def apply_phase(net: nn.Module, groups: dict, trainable: frozenset, cfg: dict, device) -> torch.optim.Optimizer:
    """Freeze what the phase freezes and build a new optimiser over what trains (one torch param
    group per schedule group, named, so `set_learning_rates` can address it)."""
    transfer.set_trainable(groups, trainable)
    return optimisation.OPTIMIZERS[cfg["optimizer"]](transfer.optimiser_groups(groups, trainable),
                                                     {**cfg, "lr": 0.0}, device)


def enter_phase(phase: schedules.Phase, previous: schedules.Phase | None, optimizer, net: nn.Module, groups: dict,
                cfg: dict, device):
    """The optimiser for `phase` after `previous`: a new one at the first phase and where the phase
    asks for it (`fresh_optimizer`, as the segmentation trainer); else the same one, with the groups
    that start training added (their state fresh, the others' carried on)."""
    if previous is None or phase.fresh_optimizer:
        return apply_phase(net, groups, phase.trainable, cfg, device)
    if phase.trainable != previous.trainable:
        transfer.set_trainable(groups, phase.trainable)
        transfer.add_starting_groups(optimizer, groups, phase.trainable)
    return optimizer


def _wrapped(objective: nn.Module, ctx):
    """The module train_step calls: DDP around the objective under torchrun (made again whenever the
    trained parameters change, as DDP fixes them when wrapping)."""
    if not ctx.distributed:
        return objective
    return DistributedDataParallel(objective, find_unused_parameters=True,
                                   device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def set_learning_rates(optimizer: torch.optim.Optimizer, schedule: schedules.Schedule, step: int) -> dict:
    lrs = schedule.lrs(step)
    for group in optimizer.param_groups:
        group["lr"] = lrs[group["name"]]
    return lrs


def rank_share(step_batches: list[list[int]], rank: int, world: int) -> tuple[list[tuple[int, list[int]]], bool]:
    """This rank's micro-batches of one optimiser step as (index in the step, case indices), and
    whether they are padding: every `world`-th from `rank`; a rank left without one gets the step's
    first, to be weighted 0."""
    mine = [(j, m) for j, m in enumerate(step_batches) if j % world == rank]
    return (mine, False) if mine else ([(0, step_batches[0])], True)


def shared_volumes(cases: list[Case], spacing, folder: Path, ctx: distributed.Context) -> list[volumes.Volume]:
    """The training cases, preprocessed (`volumes.load_case`) into `folder` once (case i by rank
    i mod world; a case already there, written atomically by an earlier attempt, is kept), then
    memory-mapped read-only by every rank (augmentation copies what it changes)."""
    for i, case in enumerate(cases):
        image_path = folder / f"{i:05d}.npy"
        if i % ctx.world_size != ctx.rank or image_path.exists():
            continue
        volume = volumes.load_case(case, spacing)
        atomic.write_json(folder / f"{i:05d}.json", {"case": case.case_id, "native_shape": list(volume.native_shape),
                                                     "native_spacing": list(volume.native_spacing)})
        with atomic.atomic_path(image_path) as tmp, open(tmp, "wb") as f:
            np.save(f, volume.image)
    distributed.barrier(ctx)
    loaded = []
    for i, case in enumerate(cases):
        meta = json.loads((folder / f"{i:05d}.json").read_text())
        if meta["case"] != case.case_id:
            raise ValueError(f"{folder / f'{i:05d}.json'} holds case {meta['case']}, expected {case.case_id}: "
                             f"remove {folder} (a run with other training cases left it)")
        loaded.append(volumes.Volume(case.case_id, np.load(folder / f"{i:05d}.npy", mmap_mode="r"), case.target,
                                     tuple(meta["native_shape"]), tuple(meta["native_spacing"])))
    return loaded


def _save(path: Path, net: nn.Module, optimizer, epochs_done: int, settings: FinetuneSettings, history: list,
          schedule: schedules.Schedule, patch: list, spec, phase: str | None = None, *, step_in_epoch: int = 0,
          epoch_sums=None, epoch_samples: int = 0, grad_scaler=None) -> None:
    """The run's state after `epochs_done` epochs and `step_in_epoch` steps of the next (with that
    epoch's loss sums over all ranks so far and its sample count)."""
    state = {"phase": phase, "network_weights": net.state_dict(),
             "optimizer_state": optimizer.state_dict() if optimizer else None,
             "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
             "step_in_epoch": int(step_in_epoch),
             "epoch_sums": epoch_sums.detach().cpu() if epoch_sums is not None else None,
             "epoch_samples": int(epoch_samples),
             "current_epoch": int(epochs_done), "settings": settings.to_dict(), "history": list(history),
             "schedule": schedule.to_dict(), "patch_size": list(patch), "task": spec.task,
             "input_channels": spec.channels}
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)


def run(settings: FinetuneSettings) -> str:
    """Fine-tune and evaluate into `settings.out_dir`; returns "finished" or "preempted"."""
    ctx = distributed.init()
    try:
        return _run(settings, ctx)
    finally:
        distributed.shutdown()


def _views(share: list[tuple[int, list[int]]], padding: bool, train_volumes: list, augment, seed: int, epoch: int,
           step_in_epoch: int, device) -> list[dict]:
    """The rank's micro-batches of one step, augmented with per-sample seeds and carrying their
    dropout seed, all keyed by (epoch, step, micro-batch index in the step, sample)."""
    views = []
    for j, indices in share:
        samples = [volumes.augmented_sample(augment, train_volumes[c], derive_seed(seed, _TAG_SAMPLE, epoch,
                                                                                     step_in_epoch, j, i))
                   for i, c in enumerate(indices)]
        image = torch.stack([s["image"] for s in samples]).float()
        if device.type == "cuda":
            image = image.pin_memory()
        view = {"image": image.to(device, non_blocking=True),
                "target": torch.tensor([int(train_volumes[c].target) for c in indices], device=device),
                "seed": derive_seed(seed, _TAG_DROPOUT, epoch, step_in_epoch, j)}
        if padding:
            view["padding"] = True
        views.append(view)
    return views


def _run(settings: FinetuneSettings, ctx: distributed.Context) -> str:
    out = Path(settings.out_dir)
    if ctx.device.type == "cpu" and settings.threads > 0:
        torch.set_num_threads(settings.threads)
    name = parse_run(settings.run)
    if name.pretrained and not settings.checkpoint:
        raise ValueError(f"run {name} is pre-trained but no checkpoint was given")
    spec = load_registry(settings.registry, settings.root).get(settings.dataset)
    check_task(spec)
    data = read_dataset(spec, verify_files=False)  # training_cases checks the files against the split's record
    train_cases, eval_cases = splits.training_cases(settings, data, name)
    cls = settings.classification
    batch_size, accumulation = int(cls["batch_size"]), int(cls["accumulation_steps"])
    epochs = training_length(settings, name)
    plan_of = functools.partial(epoch_plan, len(train_cases), batch_size, accumulation, cls["steps_per_epoch"],
                                settings.seed)  # epoch -> that epoch's plan
    steps_per_epoch = len(plan_of(0))

    torch.manual_seed(derive_seed(settings.seed, _TAG_INIT))  # the same new head on every rank
    net, keys, patch, loaded = build_model(settings, spec, name)
    family = family_of(net)
    adapters = None
    if lora.uses_lora(name.schedule):
        adapters = lora.attach(net.backbone, family, settings.schedule_config["lora"],
                               nets.adaptation_keys(net.backbone)["key_to_encoder"])
    net = net.to(ctx.device)
    groups = transfer.parameter_groups(net, keys)
    if adapters is not None:
        groups = lora.adapter_groups(groups)
    schedule = build_schedule(settings, name, family, epochs, steps_per_epoch)
    trained = transfer.trained_parameters(net, groups, frozenset().union(*(p.trainable for p in schedule.phases)))
    opt_cfg = optimiser_config(settings)
    grad_clip = math.inf if opt_cfg["grad_clip"] is None else float(opt_cfg["grad_clip"])
    objective = Objective(net, settings.label_smoothing).to(ctx.device)
    training = {"epochs": epochs, "optimiser_steps_per_epoch": steps_per_epoch, "batch_size": batch_size,
                "accumulation_steps": accumulation, "effective_batch": batch_size * accumulation}
    if ctx.is_main:
        settings.write(out / "settings.json")
        atomic.write_json(out / "schedule.json", {**schedule.to_dict(), "patch_size": patch,
                                                  "transferred_tensors": len(loaded), "family": family, **training,
                                                  "trained_parameters": trained})
    log.info("dataset %s fold %s run %s: %d training / %d evaluation cases, patch %s, %s schedule over %d epochs "
             "of %d steps (batch %d x %d accumulated)", spec.name, settings.fold, name, len(train_cases),
             len(eval_cases), patch, schedule.name, epochs, steps_per_epoch, batch_size, accumulation)

    if (out / FINAL).exists():
        # kept by the launcher only for a run with this exact record (engine.record): evaluate it again
        log.info("reusing the trained model %s: its run's settings and inputs equal this job's", out / FINAL)
        if adapters is not None:
            adapters.merge()  # the saved model is the merged, plain network
        net.load_state_dict(torch.load(out / FINAL, map_location=ctx.device, weights_only=True)["network_weights"])
        if ctx.is_main:
            _evaluate(net, spec, eval_cases, name, settings, patch, ctx, {**training, "reused": True}, trained)
        return "finished"

    train_volumes = shared_volumes(train_cases, settings.spacing, out / CASES, ctx)
    augment = volumes.classification_augmentation(patch)

    start_epoch, start_step, history = 0, 0, []
    epoch_sums, epoch_samples = None, 0
    amp_context = autocast(settings.amp, settings.amp_dtype, ctx.device)
    grad_scaler = make_grad_scaler(settings.amp, settings.amp_dtype, ctx.device)
    latest = out / LATEST
    phase, optimizer, model = None, None, objective
    if latest.exists():
        saved = torch.load(latest, map_location=ctx.device, weights_only=True)
        net.load_state_dict(saved["network_weights"])
        start_epoch, history = int(saved["current_epoch"]), list(saved["history"])
        start_step = int(saved.get("step_in_epoch", 0))
        if start_step and ctx.is_main and saved.get("epoch_sums") is not None:
            epoch_sums = saved["epoch_sums"]  # the ranks' sums so far, counted once (rank 0's)
        epoch_samples = int(saved.get("epoch_samples", 0)) if start_step else 0
        if grad_scaler is not None and saved.get("grad_scaler"):
            grad_scaler.load_state_dict(saved["grad_scaler"])
        if saved.get("optimizer_state"):
            # the optimiser as it was in the phase the checkpoint was written in (the phases up to it
            # replayed, so its groups are the same), then its state
            names = [p.name for p in schedule.phases]
            last = names.index(saved["phase"]) if saved.get("phase") in names else 0
            for replayed in schedule.phases[:last + 1]:
                optimizer = enter_phase(replayed, phase, optimizer, net, groups, opt_cfg, ctx.device)
                phase = replayed
            optimizer.load_state_dict(saved["optimizer_state"])
            model = _wrapped(objective, ctx)
        log.info("resuming %s at epoch %d, step %d", latest, start_epoch, start_step)
    logger = RunLogger(out, enabled=ctx.is_main, history=history,
                       global_step=start_epoch * steps_per_epoch + start_step)
    ledger = ComputeLedger(out, ctx, stage="finetune_classification", run=settings.run,
                           precision=precision_of(settings.amp, settings.amp_dtype, ctx.device),
                           workload={"task": "cls", "architecture": name.architecture, "patch_size": list(patch),
                                     "batch_size": batch_size * accumulation})

    with StopRequest() as stop:
        for epoch in range(start_epoch, epochs):
            started = time.time()
            first = start_step if epoch == start_epoch else 0
            sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
            if first and epoch_sums is not None:
                sums += epoch_sums.to(ctx.device)
            n_samples = epoch_samples if first else 0
            lrs = schedule.lrs(epoch * steps_per_epoch + steps_per_epoch - 1)  # an epoch resumed after its last step
            for step_in_epoch, step_batches in enumerate(ledger.timed(plan_of(epoch)[first:]), first):
                step = epoch * steps_per_epoch + step_in_epoch
                current = schedule.phase_at(step)[0]
                if current is not phase:
                    optimizer = enter_phase(current, phase, optimizer, net, groups, opt_cfg, ctx.device)
                    if phase is None or current.trainable != phase.trainable:
                        model = _wrapped(objective, ctx)
                    phase = current
                    log.info("epoch %d: phase %s, training %s", epoch + 1, phase.name, sorted(phase.trainable))
                lrs = set_learning_rates(optimizer, schedule, step)
                share, padding = rank_share(step_batches, ctx.rank, ctx.world_size)
                with ledger.waiting():
                    views = _views(share, padding, train_volumes, augment, settings.seed, epoch, step_in_epoch,
                                   ctx.device)
                with ledger.step():
                    loss, stop_now = train_step(model, views, optimizer, grad_scaler, grad_clip, amp_context, ctx,
                                                stop, divisor=len(step_batches) / ctx.world_size)
                sums += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=loss.device)])
                n_samples += sum(len(m) for m in step_batches)
                if stop_now:
                    ledger.finish("preempted")
                    distributed.all_reduce_sum(sums, ctx)
                    save_state = functools.partial(_save, step_in_epoch=step_in_epoch + 1, epoch_sums=sums,
                                                    epoch_samples=n_samples, grad_scaler=grad_scaler)
                    return _preempted(out, net, optimizer, epoch, settings, logger, schedule, patch, spec, ctx,
                                      phase.name, save_state)
            distributed.all_reduce_sum(sums, ctx)
            seconds = time.time() - started
            logger.epoch({"epoch": epoch + 1, "train_loss": float(sums[0] / sums[1]), "val_loss": math.nan,
                          "lr": max(lrs.values()), "epoch_seconds": round(seconds, 3),
                          "samples_per_second": round(n_samples / max(seconds, 1e-9), 3)})
            if ctx.is_main:
                log.info("epoch %d/%d: loss %.4f, lr %s, %.1f s", epoch + 1, epochs, float(sums[0] / sums[1]),
                         {k: f"{v:.3g}" for k, v in lrs.items()}, seconds)
                if epoch + 1 < epochs:
                    _save(latest, net, optimizer, epoch + 1, settings, logger.history, schedule, patch, spec,
                          phase.name, grad_scaler=grad_scaler)
            distributed.barrier(ctx)

    ledger.finish("finished")  # before the evaluation, which rank 0 runs alone
    if adapters is not None:
        adapters.merge()
    if ctx.is_main:
        if settings.keep_checkpoint:
            _save(out / FINAL, net, None, epochs, settings, logger.history, schedule, patch, spec)
        _evaluate(net, spec, eval_cases, name, settings, patch, ctx, training, trained)
        latest.unlink(missing_ok=True)
        (out / PREEMPTED).unlink(missing_ok=True)
        shutil.rmtree(out / CASES, ignore_errors=True)
    # No barrier after the evaluation: the other ranks may exit while rank 0 scores the test set.
    logger.close()
    return "finished"


def _evaluate(net, spec, eval_cases, name, settings: FinetuneSettings, patch, ctx, training: dict,
              trained: dict) -> None:
    record = RunRecord.read(settings.out_dir)  # written by the launcher
    doc = inference.classify(net, spec, eval_cases, inference.identity(spec.name, name, settings.fold,
                                                                          settings.external_checkpoint),
                             patch, settings.spacing, ctx.device)
    doc.update(training=training, run_record=record.summary() if record else None,
               trained_parameters=trained)
    inference.write(doc, settings.out_dir)


def _preempted(out, net, optimizer, epoch, settings, logger, schedule, patch, spec, ctx, phase, save) -> str:
    # The state after the step just taken: the resumed run goes on from the next step of this epoch.
    if ctx.is_main:
        save(out / LATEST, net, optimizer, epoch, settings, logger.history, schedule, patch, spec, phase)
        atomic.write_json(out / PREEMPTED, {"epoch": epoch, "time": time.time()})
    distributed.barrier(ctx)
    logger.close()
    return "preempted"
