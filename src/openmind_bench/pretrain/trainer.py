"""The pre-training engine: one flat loop for every method (the method makes its view of the batch and
returns its loss), DDP over torchrun's processes, fp16 autocast + GradScaler on CUDA as nnssl (bf16
selectable; CPU runs in float32), per-family optimiser and
schedule, a validation loss on held-out subjects, atomic checkpoints, resume, and SIGTERM/SIGUSR1 =
checkpoint and exit cleanly.

Reproducibility: every random draw of the engine is a function of the run seed and the position in
the run (epoch, step, the sample's global index), never of the process history; the process-wide
generators (python, numpy, torch: what a plugged-in source or library may draw from) are seeded at
the start and their states, every rank's, saved in each checkpoint. A run killed at any point (kill -9,
node failure) and resumed from its last periodic checkpoint therefore ends with the weights of an
uninterrupted run, bit for bit on CPU; so does one preempted mid-epoch (the batch sources seek, see
pretrain.batches). A batch split over DDP ranks draws the masks one process would draw for it whole.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from openmind_bench import atomic, ssl
from openmind_bench.engine import checkpoint, distributed, optimisation
from openmind_bench.engine.ledger import ComputeLedger, precision_of
from openmind_bench.engine.logger import RunLogger
from openmind_bench.engine.step import (NonFiniteSteps, StopRequest, autocast, configure_backends, derive_seed,
                                        global_rng_state, grad_scaler as make_grad_scaler, progress, sample_seeds,
                                        seed_global_rngs, set_global_rng_state, to_device, train_step)
from openmind_bench.pretrain import batches as batch_sources
from openmind_bench.pretrain.settings import PretrainSettings

log = logging.getLogger(__name__)

# Streams of random numbers, kept apart by a tag in the seed derivation.
_TAG_INIT, _TAG_DATA, _TAG_SAMPLE, _TAG_TORCH, _TAG_VAL_DATA, _TAG_VAL_SAMPLE, _TAG_GLOBAL = range(7)


@dataclass(frozen=True)
class Outcome:
    status: str  # "finished" or "preempted"
    epochs_done: int
    checkpoint: Path


def make_view(method, batch: dict, seeds, device: torch.device) -> dict:
    """The method's view of a CPU batch on `device`. Methods whose views are heavy (crops, mixing,
    rotations, augmentation: `views_on_device = True`) build them from the batch already on the
    training device, in torch; the others build them on the CPU and the view moves."""
    if getattr(method, "views_on_device", False):
        return method.make_view(to_device(batch, device), seeds)
    return to_device(method.make_view(batch, seeds), device)


def validate(model, method, source, settings: PretrainSettings, ctx, local_batch: int, amp_context) -> float:
    """Mean loss over `val_steps` held-out batches; the same patches and masks every epoch."""
    if settings.val_steps <= 0:
        return math.nan
    batches = source.val(steps=settings.val_steps, rank=ctx.rank, world_size=ctx.world_size, batch_size=local_batch,
                         seed=derive_seed(settings.seed, _TAG_VAL_DATA))
    if batches is None:
        return math.nan
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    model.eval()
    try:
        with torch.no_grad():
            for step, batch in zip(range(settings.val_steps), batches):
                n = batch["image"].shape[0]
                seeds = sample_seeds(settings.seed, _TAG_VAL_SAMPLE, 0, step, ctx.rank * local_batch, n)
                view = make_view(method, batch, seeds, ctx.device)
                with amp_context:
                    sums[0] += model(view).double()
                sums[1] += 1
    finally:
        model.train()
    distributed.all_reduce_sum(sums, ctx)
    return float(sums[0] / sums[1]) if sums[1] > 0 else math.nan


def first_val_patch(source, settings: PretrainSettings, ctx, local_batch: int):
    """(batch, seeds) of the first patch of the first validation batch, the same every epoch (the
    validation's own call, so a loader's persistent validation workers serve it); None without one."""
    if settings.val_steps <= 0:
        return None
    batches = source.val(steps=settings.val_steps, rank=ctx.rank, world_size=ctx.world_size, batch_size=local_batch,
                         seed=derive_seed(settings.seed, _TAG_VAL_DATA))
    if batches is None:
        return None
    batch = next(iter(batches))
    n = batch["image"].shape[0]
    first = {k: v[:1] if hasattr(v, "shape") and len(v.shape) and v.shape[0] == n else v for k, v in batch.items()}
    return first, sample_seeds(settings.seed, _TAG_VAL_SAMPLE, 0, 0, ctx.rank * local_batch, 1)


def training_probe(settings: PretrainSettings, arch, network_patch, source, ctx, local_batch: int):
    """The main rank's probes (`pretrain.probe_every`) and its fixed validation patch; (None, None)
    when the run has none."""
    if not (settings.probe_every and settings.probe and ctx.is_main):
        if settings.probe_every and not settings.probe and ctx.is_main:
            log.warning("pretrain.probe_every is %s but the run names no probe dataset: no probes",
                        settings.probe_every)
        return None, None
    from openmind_bench.pretrain.monitor import TrainingProbe

    probe = TrainingProbe(settings.probe, functools.partial(arch.build, network_patch), network_patch, ctx.device,
                          settings.out_dir)
    return probe, functools.partial(first_val_patch, source, settings, ctx, local_batch)


def run(settings: PretrainSettings, source: batch_sources.BatchSource | None = None) -> Outcome:
    """Pre-train (or continue pre-training) into `settings.out_dir`; see the module docstring."""
    ctx = distributed.init()
    try:
        return _run(settings, source if source is not None else batch_sources.resolve(settings), ctx)
    finally:
        distributed.shutdown()


def _run(settings: PretrainSettings, source, ctx: distributed.Context) -> Outcome:
    out = Path(settings.out_dir)
    final, latest = out / checkpoint.FINAL, out / checkpoint.LATEST
    if settings.total_batch_size % ctx.world_size:
        raise ValueError(f"total_batch_size {settings.total_batch_size} is not divisible by {ctx.world_size} processes")
    if ctx.device.type == "cpu" and settings.threads > 0:
        torch.set_num_threads(settings.threads)
    configure_backends(ctx.device)
    local_batch = settings.total_batch_size // ctx.world_size
    ledger = ComputeLedger(out, ctx, stage="pretrain", run=out.name,
                           precision=precision_of(settings.amp, settings.amp_dtype, ctx.device),
                           workload={"method": settings.method, "architecture": settings.architecture,
                                     "patch_size": list(settings.patch_size), "batch_size": settings.total_batch_size},
                           compiled=settings.compile)
    epochs, steps = settings.epochs, settings.steps_per_epoch

    arch = settings.arch()
    patch = [int(p) for p in settings.patch_size]
    # The network sees `network_patch` (SimCLR, VoCo: crops of the loader's region); the plan records it.
    _, network_patch = ssl.patch_sizes(settings.method, arch.family, patch, settings.method_settings)
    torch.manual_seed(derive_seed(settings.seed, _TAG_INIT))  # same initial weights on every rank
    backbone = arch.build(network_patch)
    method_settings = ssl.settings_for(settings.method, arch.family, settings.method_settings)
    method = ssl.build(settings.method, backbone, arch, patch, settings.method_settings).to(ctx.device)
    optimizer = optimisation.build_optimizer(method.parameters(), settings.optimisation, ctx.device)
    grad_scaler = make_grad_scaler(settings.amp, settings.amp_dtype, ctx.device)
    plan = checkpoint.adaptation_plan(arch, backbone, settings, patch_size=network_patch)

    start_epoch, start_step, history, partial, rng_states = 0, 0, [], [0.0, 0], []
    if latest.exists():
        state = checkpoint.load(latest, map_location=ctx.device)
        checkpoint.check_resumable(state, settings, latest)
        checkpoint.restore(state, method, optimizer, grad_scaler)
        start_epoch, start_step = state["current_epoch"], state["step_in_epoch"]
        history, partial = state["history"], state.get("partial_epoch", [0.0, 0])
        rng_states = state.get("rng_states", [])
        del state
        log.info("resuming from %s at epoch %d, step %d", latest, start_epoch, start_step)
    elif ctx.is_main:
        settings.write(out / "settings.json")

    model = method
    if ctx.distributed:
        # ResEnc decoders' deep-supervision heads exist (for loadable state dicts) but get no gradient;
        # the search for such parameters costs a pass over the graph every step, so only where needed.
        model = DistributedDataParallel(method, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                        find_unused_parameters=ssl.unused_parameters(settings.method, arch.family))
    if settings.compile:
        model = torch.compile(model)
    amp_context = autocast(settings.amp, settings.amp_dtype, ctx.device)
    nonfinite = NonFiniteSteps(settings.max_nonfinite_steps)
    logger = RunLogger(out, enabled=ctx.is_main, history=history, global_step=start_epoch * steps + start_step)
    grad_clip = ssl.grad_clip(settings.method, arch.family, float(settings.optimisation.get("grad_clip", math.inf)),
                              settings.method_settings)
    probe, val_patch = training_probe(settings, arch, network_patch, source, ctx, local_batch)

    def save(path: Path, epochs_done: int, step_in_epoch: int, partial_epoch=None) -> None:
        states = distributed.all_gather_object(global_rng_state(), ctx)
        if ctx.is_main:
            checkpoint.save(path, method=method, optimizer=optimizer, grad_scaler=grad_scaler,
                            current_epoch=epochs_done, step_in_epoch=step_in_epoch, plan=plan, settings=settings,
                            history=logger.history, partial_epoch=partial_epoch, method_settings=method_settings,
                            rng_states=states)
        distributed.barrier(ctx)

    def preempted(stop: StopRequest, epochs_done: int, step_in_epoch: int, partial_epoch) -> Outcome:
        if partial_epoch is not None:  # the interrupted epoch's loss sum of all ranks, resumed by rank 0 alone
            partial_epoch = distributed.all_reduce_sum(partial_epoch.clone(), ctx).tolist()
        save(latest, epochs_done, step_in_epoch, partial_epoch)
        if ctx.is_main:
            name = signal.Signals(stop.signal).name if stop.signal else "a stop request"
            atomic.write_json(out / checkpoint.PREEMPTED, {"signal": name, "epoch": epochs_done,
                                                         "step_in_epoch": step_in_epoch, "time": time.time()})
            log.warning("%s: checkpoint at epoch %d step %d written to %s; exiting", name, epochs_done,
                        step_in_epoch, latest)
        ledger.finish("preempted")
        logger.close()
        return Outcome("preempted", epochs_done, latest)

    # The process-wide generators continue where the interrupted run left them (a fresh run seeds them).
    if len(rng_states) == ctx.world_size:
        set_global_rng_state(rng_states[ctx.rank])
    else:
        if rng_states:
            log.warning("%s holds the random state of %d processes, this run has %d: the resumed run draws anew "
                        "wherever the position-derived seeds do not reach", latest, len(rng_states), ctx.world_size)
        seed_global_rngs(derive_seed(settings.seed, _TAG_GLOBAL, start_epoch, start_step, ctx.rank))
    with StopRequest() as stop:
        for epoch in range(start_epoch, epochs):
            first = start_step if epoch == start_epoch else 0
            lr = optimisation.learning_rate(settings.optimisation, epoch, epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            resumed = partial if epoch == start_epoch and ctx.is_main else [0.0, 0]
            sums = torch.tensor(resumed, dtype=torch.float64, device=ctx.device)
            started, done_steps = time.time(), first
            batches = ledger.timed(source.train(epoch=epoch, first_step=first, steps=steps - first, rank=ctx.rank,
                                                world_size=ctx.world_size, batch_size=local_batch,
                                                seed=derive_seed(settings.seed, _TAG_DATA, epoch)))
            model.train()
            for step, batch in progress(zip(range(first, steps), batches), steps - first,
                                         f"epoch {epoch + 1}/{epochs}", ctx.is_main):
                seeds = sample_seeds(settings.seed, _TAG_SAMPLE, epoch, step, ctx.rank * local_batch,
                                     batch["image"].shape[0])
                view = make_view(method, batch, seeds, ctx.device)
                # Global RNG (drop-path, dropout) seeded from the position in the run.
                torch.manual_seed(derive_seed(settings.seed, _TAG_TORCH, epoch, step, ctx.rank))
                with ledger.step():
                    loss, stop_now = train_step(model, view, optimizer, grad_scaler, grad_clip, amp_context, ctx, stop,
                                                nonfinite)
                if not nonfinite.last_skipped:  # a skipped step's loss stays out of the epoch mean
                    sums += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=loss.device)])
                done_steps = step + 1
                global_step = epoch * steps + done_steps
                if settings.log_every_steps and global_step % settings.log_every_steps == 0:
                    logger.step(global_step, float(loss))
                if stop_now:
                    return preempted(stop, epoch, done_steps, sums)
            if done_steps < steps:
                raise RuntimeError(f"the batch source ended after {done_steps} of {steps} steps in epoch {epoch}")
            seconds = time.time() - started
            val_loss = validate(model, method, source, settings, ctx, local_batch, amp_context)
            distributed.all_reduce_sum(sums, ctx)
            row = {
                "epoch": epoch + 1,
                "train_loss": float(sums[0] / sums[1]),
                "val_loss": val_loss,
                "lr": lr,
                "epoch_seconds": round(seconds, 3),
                "samples_per_second": round((steps - first) * settings.total_batch_size / max(seconds, 1e-9), 3),
            }
            if probe is not None and probe.due(epoch + 1):  # main rank; the others wait at the next collective
                scores, panels = probe(method, epoch + 1, val_patch)
                row.update(scores)
                if panels is not None:
                    logger.image("probe/reconstruction", panels, epoch + 1)
                log.info("epoch %d probes (%.1f s): %s", epoch + 1, scores["probe_seconds"],
                         {k: round(v, 3) for k, v in scores.items() if k != "probe_seconds"})
            logger.epoch(row)
            if ctx.is_main:
                log.info("epoch %d/%d: train loss %.5f, val loss %.5f, lr %.3g, %.1f s", epoch + 1, epochs,
                         row["train_loss"], val_loss, lr, seconds)
            epochs_done = epoch + 1
            if epochs_done < epochs and epochs_done % max(settings.checkpoint_every, 1) == 0:
                save(latest, epochs_done, 0)
            if epochs_done < epochs:
                flag = torch.tensor([1.0 if stop.requested else 0.0], device=ctx.device)
                if distributed.all_reduce_max(flag, ctx)[0] > 0:
                    return preempted(stop, epochs_done, 0, None)

    save(final, epochs, 0)
    if probe is not None:
        from openmind_bench.pretrain.monitor import write_probe_curve

        write_probe_curve(logger.history, out)
    if ctx.is_main:
        latest.unlink(missing_ok=True)
        (out / checkpoint.PREEMPTED).unlink(missing_ok=True)
        log.info("pre-training done: %s", final)
    ledger.finish("finished")
    logger.close()
    return Outcome("finished", epochs, final)
