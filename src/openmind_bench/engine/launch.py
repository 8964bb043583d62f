"""Start a training stage under torchrun (`--standalone --nproc-per-node N`; one process on a CPU; on
several nodes of a SLURM job one torchrun per node through `srun`, with c10d rendezvous on the job's
first node) and stand between it and the scheduler: SIGTERM / SIGUSR1 / SIGINT reach the workers as SIGTERM (torchrun
by default does not handle SIGUSR1, whose default action would kill it), worker output is relayed
into the job's log, and the exit code says whether the run finished (0), was preempted after a
checkpoint (`preemption_exit_code`) or failed (RuntimeError).

One launcher for every stage: the caller names its worker module (`python -m WORKER SETTINGS_JSON`
is one torchrun process), the file whose presence means "done", the marker a preempted run writes,
and the run's record (`engine.record`): the state in the run folder (checkpoints, logs, the "done"
file) is used only when it was made with exactly the settings and inputs of this launch; otherwise it
is removed and the run starts anew. A "done" file kept that way is the result (nothing is trained).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

import openmind_bench
from openmind_bench.engine.record import RunRecord, prepare_run_dir

log = logging.getLogger(__name__)
worker_log = logging.getLogger("openmind_bench.engine.workers")

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class LaunchSettings(Protocol):
    out_dir: str
    threads: int
    preemption_exit_code: int

    def write(self, path: str | Path) -> None: ...


def threads_per_process(threads: int, nproc: int, num_workers: int = 0) -> int:
    """The torch / OpenMP threads of one training process when the job has `threads` CPUs for `nproc`
    processes, each with `num_workers` data-loading workers (one CPU each: a DataLoader worker runs
    torch on one thread); at least 1. 0 when `threads` is 0 (torch's default)."""
    if not threads:
        return 0
    return max(1, int(threads) // max(1, int(nproc)) - max(0, int(num_workers)))


def torchrun_command(settings_path: str | Path, nproc: int, worker: str, *, nodes: int = 1,
                     rendezvous: str = "", job_id: str = "", threads: int = 0, gpus: bool = False) -> list[str]:
    """One node: torchrun --standalone. Several: `srun` starts one torchrun per node of the job, which
    meet at `rendezvous` (host:port, c10d) under the job's id; `threads` CPUs and `nproc` GPUs
    (`gpus`) per node's task."""
    run = [sys.executable, "-m", "torch.distributed.run"]
    tail = [f"--nproc-per-node={int(nproc)}", "-m", worker, str(settings_path)]
    if nodes <= 1:
        return [*run, "--standalone", *tail]
    step = ["srun", f"--nodes={int(nodes)}", f"--ntasks={int(nodes)}", "--ntasks-per-node=1",
            # one node's torchrun failing (a dead node, a lost rendezvous) ends the others' too
            "--kill-on-bad-exit=1", "--export=ALL"]
    if threads:
        step.append(f"--cpus-per-task={int(threads)}")
    if gpus:
        step.append(f"--gres=gpu:{int(nproc)}")
    # Node 0 of the step (the job's first node, the endpoint's) hosts the rendezvous store, the others
    # join it: torchrun's own guess compares the endpoint with the machine's names and addresses and
    # misses addresses of secondary network interfaces (then no node hosts, and all wait).
    host_is_node0 = 'PET_RDZV_CONF=is_host=$([ "$SLURM_NODEID" = 0 ] && echo 1 || echo 0) exec "$0" "$@"'
    return [*step, "sh", "-c", host_is_node0, *run, f"--nnodes={int(nodes)}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rendezvous}", f"--rdzv-id={job_id}", *tail]


RDZV_PORT_ENV = "OMB_RDZV_PORT"


def _scontrol(*args: str) -> str:
    try:
        out = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"scontrol {' '.join(args)} failed: {e}") from None
    if out.returncode:
        raise RuntimeError(f"scontrol {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def slurm_rendezvous(env: dict | None = None) -> tuple[str, str]:
    """("host:port", job id) of a multi-node job's c10d rendezvous: the first host of the job's node
    list (`scontrol show hostnames`), at the address SLURM reaches it by (its NodeAddr), and a port
    from OMB_RDZV_PORT or, by default, one of 29400-30399 picked by the job id (two jobs sharing a
    first node do not meet; a requeued job keeps its port)."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID", "")
    if not job_id:
        raise RuntimeError("pre-training on several nodes (config key 'pretrain.resources.nodes') runs inside "
                           "a SLURM job (snakemake --profile slurm); SLURM_JOB_ID is not set")
    # The executor plugin's job step drops SLURM_JOB_NODELIST (it keeps SLURM_JOB_ID): ask slurmctld.
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        found = re.search(r"(?:^|\s)NodeList=(\S+)", _scontrol("show", "job", "-o", job_id))
        if not found or found.group(1) in ("", "(null)"):
            raise RuntimeError(f"SLURM job {job_id} has no node list (scontrol show job)")
        nodelist = found.group(1)
    first = _scontrol("show", "hostnames", nodelist).split()[0]
    found = re.search(r"(?:^|\s)NodeAddr=(\S+)", _scontrol("show", "node", "-o", first))
    host = found.group(1) if found else first
    port = env.get(RDZV_PORT_ENV) or str(29400 + int(re.sub(r"\D", "", job_id) or 0) % 1000)
    return f"{host}:{port}", job_id


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


# ---- training processes die with their job
# torchrun starts its workers in sessions of their own, so killing the job's process group (Snakemake
# killed with -9, `scancel` of a batch script without a step) leaves them running: they would finish
# the run, delete the checkpoint a re-run resumes from, and share the folder with that re-run. Three
# guards: torchrun gets a parent-death signal from the launcher; every worker watches its parent (torchrun)
# and stops as on a preemption (checkpoint, exit) when it is gone, killing itself if that takes
# longer than the grace period; and rank 0 holds the run folder's lock, which a new launch waits for.
LOCK = ".training.lock"
PR_SET_PDEATHSIG = 1


def _parent_death_signal(signum: int = signal.SIGTERM):
    """A `preexec_fn` giving the child `signum` when the launcher dies (Linux; elsewhere nothing)."""

    def preexec():
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        except (OSError, AttributeError):  # not Linux
            pass

    return preexec if sys.platform.startswith("linux") else None


def watch_parent(grace_s: float, interval_s: float = 1.0) -> threading.Thread:
    """In a worker: when the parent process is gone (this process was re-parented), SIGTERM this
    process (the training loop checkpoints and returns, as on a preemption), and SIGKILL it if it is
    still alive `grace_s` seconds later."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval_s)
        log.error("the launching process (pid %d) is gone: stopping this training process (pid %d)", parent,
                  os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def hold_run_lock(out_dir: str | Path):
    """In rank 0: hold the run folder's lock for the life of this process (released by the kernel
    when the process dies, however it dies). Returns the open file."""
    path = Path(out_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def wait_for_run_lock(out_dir: str | Path, timeout_s: float) -> None:
    """Wait until no process of an earlier launch holds the run folder's lock (an orphaned worker
    stopping); an error naming its pid after `timeout_s`."""
    path = Path(out_dir) / LOCK
    if not path.exists():
        return
    deadline = time.monotonic() + timeout_s
    with open(path, "a+") as handle:
        warned = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                holder = path.read_text().strip() or "?"
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another training process (pid {holder}) still writes into {path.parent} "
                                       f"after {timeout_s:.0f} s: stop it, then run the job again") from None
                if not warned:
                    log.warning("waiting for an earlier training process (pid %s) to leave %s", holder, path.parent)
                    warned = True
                time.sleep(0.5)


def shutdown_grace_s() -> float:
    return float(os.environ.get("PET_SHUTDOWN_TIMEOUT", "120"))


def worker_main(argv: list[str] | None, worker: str, read_settings, run) -> int:
    """Body of a worker module's `main`: read the settings JSON, run, map the status to an exit code.
    `run(settings)` returns "finished" or "preempted"."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m {worker} SETTINGS_JSON", file=sys.stderr)
        return 2
    configure_worker_logging()
    watch_parent(shutdown_grace_s())
    settings = read_settings(argv[0])
    lock = hold_run_lock(settings.out_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        return settings.preemption_exit_code if run(settings) == "preempted" else 0
    finally:
        if lock is not None:
            lock.close()


def launch(settings: LaunchSettings, *, worker: str, done: str, preempted: str, record: RunRecord,
           state: tuple[str, ...], nproc: int = 1, threads: int = 0, label: str = "training", nodes: int = 1,
           gpus: bool = False) -> int:
    """Run `worker` to the end (or to a preemption) in `nproc` torchrun processes on each of `nodes`
    nodes (several: inside a SLURM job, `slurm_rendezvous`).

    `done` / `preempted`: file names in `settings.out_dir`; `record` / `state`: the run's record and
    the names of its state in that folder (`engine.record.prepare_run_dir`); `threads`: CPU threads
    of each node, split over its processes and their data-loading workers (torch and OpenMP);
    `gpus`: the processes use GPUs (the step asks for `nproc` per node)."""
    nproc, nodes = max(1, int(nproc)), max(1, int(nodes))
    rendezvous, job_id = slurm_rendezvous() if nodes > 1 else ("", "")
    out = Path(settings.out_dir)
    done_path, marker = out / done, out / preempted
    # an orphaned worker of a killed launch stops within its grace period: never share the folder with it
    wait_for_run_lock(out, shutdown_grace_s() + 30)
    prepare_run_dir(out, record, (*state, done, preempted), label=f"{label} {out}")
    if done_path.exists():
        log.info("%s: %s of a run with these exact settings and inputs exists: it is the result", label, done_path)
        return 0
    if threads:
        # the loader's worker processes share the job's CPUs with the training processes
        settings.threads = threads_per_process(threads, nproc, getattr(settings, "num_workers", 0))
    settings_path = out / "settings.json"
    settings.write(settings_path)
    env = torchrun_env(settings.threads)
    relay = not sys.stderr.isatty()
    started = time.time()
    cmd = torchrun_command(settings_path, nproc, worker, nodes=nodes, rendezvous=rendezvous, job_id=job_id,
                           threads=threads, gpus=gpus)
    log.info("starting %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if relay else None,
                            stderr=subprocess.STDOUT if relay else None, text=True, bufsize=1,
                            preexec_fn=_parent_death_signal())
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
