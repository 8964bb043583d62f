"""The compute ledger: what one training run cost, written as `compute.json` beside its checkpoint
(pre-training) or its metrics.json (fine-tuning).

A loop holds one `ComputeLedger` and calls three hooks: `timed(batches)` (or `waiting()` around the
code that makes a batch) for the time a step waited for its data, `step()` around each optimiser
step, `finish(status)` on every rank at the end (it gathers the ranks' figures; rank 0 writes).

Fields (`FIELDS`): device type, name and count, nodes, processes, threads per process, precision,
wall time, GPU-hours (CUDA; else CPU-hours = wall x processes x threads), optimiser steps, the time
inside the training loops (data wait + step; validation and checkpoints between epochs are left
out) and steps/s over it, peak memory per device (CUDA: `max_memory_allocated`; CPU: the
process's peak RSS), FLOPs per step counted by `torch.utils.flop_counter.FlopCounterMode` on the
first step of the run (the real network, patch and micro-batches, forward + backward), MFU where
the device's peak is in `PEAK_TFLOPS`, and the data wait per device (total, per step, fraction of
the loop time). Every step syncs the host with the device (the loss flags' collective), so the
wait measured on the host is time the device sat idle.

A ledger never stops a run: a FLOP count that fails leaves `flops_per_step` empty and says why in
`flops_note` (the counter sees only the ops it knows, matmuls and convolutions: others are free to
it); a ledger that cannot be written logs a warning. A run preempted and resumed adds up its
segments: a `compute.json` with status `preempted` in the run folder is one of this run's earlier
segments (the launcher removes the folder's state when the run record differs). A job that trains
nothing (a finished model scored again) leaves the finished ledger as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import time
from pathlib import Path

import torch

from openmind_bench import atomic
from openmind_bench.engine import distributed

log = logging.getLogger(__name__)

LEDGER_FILE = "compute.json"

# Dense (no sparsity) tensor-core peaks per device, TFLOP/s, from NVIDIA's data sheets; the first
# entry whose text is in `torch.cuda.get_device_name()` wins (PCIe / NVL parts before the SXM one).
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0}),
    ("H200", {"bfloat16": 989.0, "float16": 989.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0}),
)

FIELDS = (
    "stage", "run", "status", "segments", "device_type", "device_name", "device_count", "nodes", "processes",
    "threads_per_process", "precision", "wall_seconds", "gpu_hours", "cpu_hours", "steps", "train_seconds",
    "steps_per_second", "peak_memory_bytes", "peak_memory_kind", "flops_per_step", "flops_note",
    "peak_flops_per_device", "mfu", "data_wait_seconds", "data_wait_ms_per_step", "data_wait_fraction",
    "workload",
)
# Summed over the segments of a preempted and resumed run.
_ADDED = ("wall_seconds", "gpu_hours", "cpu_hours", "steps", "train_seconds")


def peak_flops(device_name: str, precision: str) -> float | None:
    """FLOP/s of one device at `precision` ("bfloat16", "float16"), or None when not in the table."""
    for key, peaks in PEAK_TFLOPS:
        if key in device_name:
            tflops = peaks.get(precision)
            return tflops * 1e12 if tflops else None
    return None


def precision_of(amp: bool, amp_dtype: str, device: torch.device) -> str:
    """What the matmuls run in: the autocast dtype on CUDA with `amp`, else float32 (engine.step.autocast)."""
    return amp_dtype if device.type == "cuda" and amp else "float32"


def count_flops(fn) -> tuple[int | None, str | None]:
    """(FLOPs of `fn()`, None), or (None, why) when the counter cannot count it; `fn` runs once either way
    unless the counter fails before it starts."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
    except Exception as e:  # noqa: BLE001 - the ledger never stops a run
        fn()
        return None, f"no FLOP counter: {type(e).__name__}: {e}"
    with counter:
        fn()
    return int(counter.get_total_flops()), None


class ComputeLedger:
    """Hooks for a training loop (module doc). `workload`: what the step computes (method,
    architecture, patch, batch...), recorded for `openmind-bench estimate` to match runs by."""

    def __init__(self, out_dir: str | Path, ctx: distributed.Context, *, stage: str, run: str, precision: str,
                 workload: dict | None = None, compiled: bool = False):
        self.started = time.perf_counter()
        self.path = Path(out_dir) / LEDGER_FILE
        self.ctx = ctx
        self.stage, self.run, self.precision = stage, run, precision
        self.workload = dict(workload or {})
        self.steps = 0
        self.train_seconds = 0.0
        self.wait_seconds = 0.0
        self.flops_per_device: int | None = None
        self.flops_note: str | None = "no step ran"
        self._counted = False
        if compiled:
            self.skip_flop_count("the model is torch.compile'd (a run with compile off counts it)")
        self._mark: float | None = None
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)

    def skip_flop_count(self, why: str) -> None:
        """No FLOP count (a dispatch mode around a torch.compile'd model is not tried on a real run)."""
        self._counted, self.flops_note = True, f"not counted: {why}"

    def with_workload(self, **fields) -> "ComputeLedger":
        self.workload.update(fields)
        return self

    # ------------------------------------------------------------------ hooks
    def epoch_start(self) -> None:
        """The loop time starts (again) here: what ran since the last step (validation, checkpoints) is not loop time."""
        self._mark = time.perf_counter()

    def timed(self, batches):
        """`batches`, with the time each `next()` took counted as data wait."""
        self.epoch_start()
        iterator = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.wait_seconds += time.perf_counter() - t0
            yield item

    def timed_loader(self, loader) -> "TimedLoader":
        """`loader` (an object others call `next()` on, e.g. nnU-Net's augmenter) with its waits counted."""
        return TimedLoader(loader, self)

    @contextlib.contextmanager
    def waiting(self):
        """Time spent in the block is data wait (a loop that makes its batches itself)."""
        t0 = time.perf_counter()
        if self._mark is None:
            self._mark = t0
        try:
            yield
        finally:
            self.wait_seconds += time.perf_counter() - t0

    @contextlib.contextmanager
    def step(self):
        """One optimiser step; the first one of the process is run under the FLOP counter."""
        if self._mark is None:
            self._mark = time.perf_counter()
        counter = None
        if not self._counted:
            self._counted = True
            counter = self._enter_counter()
        try:
            yield
        finally:
            if counter is not None:
                self._exit_counter(counter)
        now = time.perf_counter()
        self.train_seconds += now - self._mark
        self._mark = now
        self.steps += 1

    def _enter_counter(self):
        try:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            counter.__enter__()
            return counter
        except Exception as e:  # noqa: BLE001 - the ledger never stops a run
            self.flops_note = f"FLOP counter failed to start: {type(e).__name__}: {e}"
            return None

    def _exit_counter(self, counter) -> None:
        try:
            counter.__exit__(None, None, None)
            total = int(counter.get_total_flops())
        except Exception as e:  # noqa: BLE001
            self.flops_note = f"FLOP counter failed: {type(e).__name__}: {e}"
            return
        if total > 0:
            self.flops_per_device, self.flops_note = total, None
        else:
            self.flops_note = "the FLOP counter saw no operation it knows (matmul, convolution)"

    # ------------------------------------------------------------------ the record
    def _peak_memory(self) -> float:
        if self.ctx.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated(self.ctx.device))
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0  # Linux reports KiB

    def record(self, status: str) -> dict:
        """This process's figures, the other ranks' gathered (a collective: every rank calls it)."""
        ctx = self.ctx
        per_rank = torch.zeros((ctx.world_size, 2), dtype=torch.float64, device=ctx.device)
        per_rank[ctx.rank, 0] = self._peak_memory()
        per_rank[ctx.rank, 1] = self.wait_seconds
        distributed.all_reduce_sum(per_rank, ctx)
        per_rank = per_rank.cpu().tolist()
        cuda = ctx.device.type == "cuda"
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        threads = torch.get_num_threads()
        wall = time.perf_counter() - self.started
        hours = wall / 3600.0
        name = torch.cuda.get_device_name(ctx.device) if cuda else _cpu_name()
        flops = None if self.flops_per_device is None else self.flops_per_device * ctx.world_size
        steps_per_second = self.steps / self.train_seconds if self.steps and self.train_seconds > 0 else None
        peak = peak_flops(name, self.precision) if cuda else None
        waits = [w for _, w in per_rank]
        return {
            "stage": self.stage, "run": self.run, "status": status, "segments": 1,
            "device_type": ctx.device.type, "device_name": name, "device_count": ctx.world_size,
            "nodes": max(1, ctx.world_size // max(local, 1)), "processes": ctx.world_size,
            "threads_per_process": threads, "precision": self.precision,
            "wall_seconds": wall, "gpu_hours": hours * ctx.world_size if cuda else None,
            "cpu_hours": None if cuda else hours * ctx.world_size * threads,
            "steps": self.steps, "train_seconds": self.train_seconds, "steps_per_second": steps_per_second,
            "peak_memory_bytes": [m for m, _ in per_rank],
            "peak_memory_kind": "cuda_max_allocated" if cuda else "host_max_rss",
            "flops_per_step": flops, "flops_note": self.flops_note, "peak_flops_per_device": peak,
            "mfu": mfu(self.flops_per_device, steps_per_second, peak),
            "data_wait_seconds": waits,
            "data_wait_ms_per_step": 1000.0 * sum(waits) / len(waits) / self.steps if self.steps else None,
            "data_wait_fraction": (sum(waits) / len(waits) / self.train_seconds) if self.train_seconds > 0 else None,
            "workload": self.workload,
        }

    def finish(self, status: str) -> dict | None:
        """Gather (every rank calls this) and write compute.json (rank 0); returns what was written."""
        doc = self.record(status)
        if not self.ctx.is_main:
            return None
        try:
            earlier = _read(self.path)
            if doc["steps"] == 0 and earlier and earlier.get("status") == "finished":
                return earlier  # a finished model scored again: its training's ledger stands
            if earlier and earlier.get("status") == "preempted":
                doc = combine(earlier, doc)
            atomic.write_json(self.path, doc)
        except Exception as e:  # noqa: BLE001 - the ledger never stops a run
            log.warning("compute ledger %s not written: %s: %s", self.path, type(e).__name__, e)
            return None
        return doc


class TimedLoader:
    """A loader whose `next()` counts as data wait; everything else is the loader's (`loader`)."""

    def __init__(self, loader, ledger: ComputeLedger):
        self.loader, self.ledger = loader, ledger

    def __iter__(self):
        return self

    def __next__(self):
        with self.ledger.waiting():
            return next(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def mfu(flops_per_device_step: float | None, steps_per_second: float | None, peak: float | None) -> float | None:
    """Achieved FLOP/s of one device over its peak."""
    if not flops_per_device_step or not steps_per_second or not peak:
        return None
    return flops_per_device_step * steps_per_second / peak


def combine(earlier: dict, later: dict) -> dict:
    """One ledger of two segments of a run: times, hours and steps added, peaks the larger, the rest the later's."""
    doc = dict(later)
    for key in _ADDED:
        a, b = earlier.get(key), later.get(key)
        doc[key] = None if a is None and b is None else (a or 0) + (b or 0)
    doc["segments"] = int(earlier.get("segments") or 1) + 1
    if doc["train_seconds"] and doc["steps"]:
        doc["steps_per_second"] = doc["steps"] / doc["train_seconds"]
    if later.get("flops_per_step") is None and earlier.get("flops_per_step") is not None:
        doc["flops_per_step"], doc["flops_note"] = earlier["flops_per_step"], earlier.get("flops_note")
    a, b = earlier.get("peak_memory_bytes") or [], later.get("peak_memory_bytes") or []
    if len(a) == len(b):
        doc["peak_memory_bytes"] = [max(x, y) for x, y in zip(a, b)]
        waits = [x + y for x, y in zip(earlier.get("data_wait_seconds") or [0] * len(b),
                                       later.get("data_wait_seconds") or [0] * len(b))]
        doc["data_wait_seconds"] = waits
        if doc["steps"] and waits:
            doc["data_wait_ms_per_step"] = 1000.0 * sum(waits) / len(waits) / doc["steps"]
            doc["data_wait_fraction"] = (sum(waits) / len(waits) / doc["train_seconds"]
                                         if doc["train_seconds"] else None)
    flops, processes = doc.get("flops_per_step"), doc.get("processes") or 1
    doc["mfu"] = mfu(flops / processes if flops else None, doc.get("steps_per_second"),
                     doc.get("peak_flops_per_device"))
    return doc


def read(path: str | Path) -> dict:
    """A compute.json (raises OSError / ValueError naming the file when it is not one)."""
    doc = _read(Path(path))
    if doc is None:
        raise OSError(f"{path}: no compute ledger")
    missing = [k for k in ("stage", "steps", "wall_seconds") if k not in doc]
    if missing:
        raise ValueError(f"{path}: not a compute ledger (fields {missing} missing)")
    return doc


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return doc if isinstance(doc, dict) else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"
