"""Start a training stage under torchrun (`--standalone --nproc-per-node N`; one process on a CPU) and
stand between it and the scheduler: SIGTERM / SIGUSR1 / SIGINT reach the workers as SIGTERM (torchrun
by default does not handle SIGUSR1, whose default action would kill it), worker output is relayed
into the job's log, and the exit code says whether the run finished (0), was preempted after a
checkpoint (`preemption_exit_code`) or failed (RuntimeError).

One launcher for every stage: the caller names its worker module (`python -m WORKER SETTINGS_JSON`
is one torchrun process), the file whose presence means "done" and the marker a preempted run
writes. A job that runs again (Snakemake reruns it because its settings changed, or it was forced)
starts anew: a stale "done" file is removed first, never taken as the result.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

import openmind_bench

log = logging.getLogger(__name__)
worker_log = logging.getLogger("openmind_bench.engine.workers")

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class LaunchSettings(Protocol):
    out_dir: str
    threads: int
    preemption_exit_code: int

    def write(self, path: str | Path) -> None: ...


def torchrun_command(settings_path: str | Path, nproc: int, worker: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}",
            "-m", worker, str(settings_path)]


def torchrun_env(threads: int) -> dict:
    """Environment of a torchrun job: this package first on the path, signals passed on."""
    src = str(Path(openmind_bench.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
        # torchrun options as environment (older torch ignores them): pass SIGUSR1 on too (SLURM's
        # `--signal=USR1@...` reaches every process of the step, torchrun included), and give the
        # workers time to write their checkpoint before torchrun kills them.
        "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "PET_SHUTDOWN_TIMEOUT": os.environ.get("PET_SHUTDOWN_TIMEOUT", "120"),
    }
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def configure_worker_logging() -> None:
    """Log lines of a torchrun process name their rank; ranks other than 0 only warn."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.captureWarnings(True)


def worker_main(argv: list[str] | None, worker: str, read_settings, run) -> int:
    """Body of a worker module's `main`: read the settings JSON, run, map the status to an exit code.
    `run(settings)` returns "finished" or "preempted"."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m {worker} SETTINGS_JSON", file=sys.stderr)
        return 2
    configure_worker_logging()
    settings = read_settings(argv[0])
    return settings.preemption_exit_code if run(settings) == "preempted" else 0


def launch(settings: LaunchSettings, *, worker: str, done: str, preempted: str, nproc: int = 1,
           threads: int = 0, label: str = "training") -> int:
    """Run `worker` to the end (or to a preemption) in `nproc` torchrun processes.

    `done` / `preempted`: file names in `settings.out_dir`; `threads`: CPU threads for the whole job,
    split over the processes (torch and OpenMP)."""
    nproc = max(1, int(nproc))
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done_path, marker = out / done, out / preempted
    if done_path.exists():
        log.info("%s exists from an earlier run: running again replaces it", done_path)
        done_path.unlink()
    if threads:
        settings.threads = max(1, int(threads) // nproc)
    settings_path = out / "settings.json"
    settings.write(settings_path)
    env = torchrun_env(settings.threads)
    relay = not sys.stderr.isatty()
    started = time.time()
    cmd = torchrun_command(settings_path, nproc, worker)
    log.info("starting %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if relay else None,
                            stderr=subprocess.STDOUT if relay else None, text=True, bufsize=1)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        if relay:
            for line in proc.stdout:
                worker_log.info("%s", line.rstrip("\n"))
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if done_path.exists():
        return 0
    # A marker older than this launch belongs to an earlier preemption, not to this run.
    if marker.exists() and marker.stat().st_mtime >= started - 1:
        log.warning("%s stopped by %s after a checkpoint; rerun to continue", label,
                    signal.Signals(received[0]).name if received else "a signal")
        return settings.preemption_exit_code
    raise RuntimeError(f"{label} into {out} failed (torchrun exit code {code}); see the log above")
