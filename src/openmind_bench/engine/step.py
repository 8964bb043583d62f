"""One optimisation step and what every training loop around it needs: stop requests (SIGTERM /
SIGUSR1 from the scheduler), autocast, seeds derived from the position in a run, moving a view to
the device. Used by pre-training and by classification fine-tuning alike."""

from __future__ import annotations

import contextlib
import random
import signal

import numpy as np
import torch

from openmind_bench.engine import distributed

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def derive_seed(*keys: int) -> int:
    """A seed that is a function of `keys` alone (run seed, stream tag, epoch, step, sample...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def sample_seeds(run_seed: int, tag: int, epoch: int, step: int, first_index: int, n: int) -> list[int]:
    return [derive_seed(run_seed, tag, epoch, step, first_index + i) for i in range(n)]


def seed_global_rngs(seed: int) -> None:
    """Seed the process-wide generators (python, numpy, torch) that code outside the engine's derived
    seeds may draw from (a plugged-in batch source, a library's augmentation)."""
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))


def global_rng_state() -> dict:
    """The process-wide generators' state, as tensors, numbers and lists (`weights_only` loads it)."""
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [int(version), [int(v) for v in internal], gauss],
        "numpy": {"name": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["key"].cpu().numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM preemption, time limit, torchrun shutting down) set a flag; the loop
    checkpoints at the next step boundary and returns."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signal = signum

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signal is not None


def to_device(view: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in view.items()}


def configure_backends(device: torch.device) -> None:
    """On CUDA let cuDNN time its convolution algorithms once per input shape and keep the fastest
    (nnU-Net and nnssl do; a training run's shapes never change). CPU runs are left as they are."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def autocast(amp: bool, amp_dtype: str, device: torch.device):
    """Mixed precision on CUDA when `amp`; CPU runs in float32."""
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=AMP_DTYPES[amp_dtype])
    return contextlib.nullcontext()


def grad_scaler(amp: bool, amp_dtype: str, device: torch.device):
    """A GradScaler where float16 autocast needs one, else None."""
    if device.type == "cuda" and amp and amp_dtype == "float16":
        return torch.amp.GradScaler("cuda")
    return None


class NonFiniteSteps:
    """Optimisation steps skipped in a row for a non-finite loss (on any rank). A transient fp16
    overflow skips its step, as nnssl and nnU-Net do (their GradScaler skips the step and lowers its
    scale); `limit` skips in a row mean the run diverged and raise."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"the limit of non-finite steps in a row must be >= 1, got {limit}")
        self.limit = int(limit)
        self.in_row = 0
        self.skipped = 0
        self.last_skipped = False

    def skip(self, loss: float, rank: int) -> None:
        self.in_row += 1
        self.skipped += 1
        self.last_skipped = True
        if self.in_row >= self.limit:
            raise FloatingPointError(f"non-finite loss in {self.in_row} steps in a row (last {loss} on rank {rank}): "
                                     "the run diverged")

    def stepped(self) -> None:
        self.in_row = 0
        self.last_skipped = False


def train_step(model, view, optimizer, grad_scaler, grad_clip: float, amp_context, ctx, stop: StopRequest | None,
               nonfinite: NonFiniteSteps | None = None, divisor: float | None = None):
    """Forward and backward of `view` (a dict; or a list of micro-batches whose gradients accumulate,
    each loss divided by `divisor`, by default their number, DDP syncing on the last only; a caller
    that spreads one step's micro-batches unevenly over the ranks passes their total / world size,
    so DDP's mean over ranks is the whole step's gradient), one collective that agrees
    on (loss not finite, stop requested) over all ranks, then clip and step. Returns (mean loss,
    stop_requested). A non-finite loss never reaches the optimiser: without `nonfinite` it raises;
    with it, every rank skips the step (`nonfinite.last_skipped`), the GradScaler's scale drops by its
    backoff factor, and `nonfinite.limit` such steps in a row raise."""
    micro = view if isinstance(view, list) else [view]
    if not micro:
        raise ValueError("train_step needs at least one micro-batch")
    optimizer.zero_grad(set_to_none=True)
    total = None
    for i, part in enumerate(micro):
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with amp_context:
                loss = model(part)
            if divisor is not None:
                loss = loss / divisor
            elif len(micro) > 1:
                loss = loss / len(micro)
            (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    flags = torch.tensor([0.0 if torch.isfinite(total) else 1.0, 1.0 if stop and stop.requested else 0.0],
                         device=total.device)
    distributed.all_reduce_max(flags, ctx)
    if flags[0] > 0:
        optimizer.zero_grad(set_to_none=True)
        if nonfinite is None:
            raise FloatingPointError(f"non-finite loss ({float(total)} on rank {ctx.rank})")
        nonfinite.skip(float(total), ctx.rank)
        if grad_scaler is not None:  # what the scaler does on inf gradients; the same on every rank
            grad_scaler.update(new_scale=grad_scaler.get_scale() * grad_scaler.get_backoff_factor())
        return total, bool(flags[1] > 0)
    if nonfinite is not None:
        nonfinite.stepped()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_scaler is not None:
        grad_scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()
    return total, bool(flags[1] > 0)


def progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (Snakemake logs get one line per epoch)
    return tqdm(iterable, total=total, desc=desc, disable=None, leave=False, dynamic_ncols=True)
