"""Start fine-tuning: in this process on a CPU or one GPU, under torchrun (`--standalone
--nproc-per-node N`) on several GPUs; `python -m openmind_bench.downstream.worker SETTINGS_JSON` is
one torchrun process. Exit code 0 when done, `preemption_exit_code` after a SIGTERM/SIGUSR1
checkpoint (rerun to continue), 1 on errors."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

from openmind_bench.downstream.finetune import FinetuneSettings
from openmind_bench.train.launch import configure_worker_logging, torchrun_command, torchrun_env

log = logging.getLogger(__name__)


def uses_nnunet(settings: FinetuneSettings) -> bool:
    """Segmentation datasets fine-tune inside nnU-Net v2 (`downstream.nnunet.engine: builtin` keeps
    the MONAI loop below, until it is removed)."""
    from openmind_bench.downstream.registry import load_registry

    if (settings.nnunet or {}).get("engine") == "builtin":
        return False
    return load_registry(settings.registry, settings.root).get(settings.dataset).task == "seg"


def launch(settings: FinetuneSettings, nproc: int = 1, *, threads: int = 0) -> int:
    nproc = max(1, int(nproc))
    if uses_nnunet(settings):
        from openmind_bench.downstream.nnunet.run import finetune_segmentation

        if nproc > 1:
            log.warning("nnU-Net fine-tuning runs on one GPU (as the papers'); %d requested", nproc)
        finetune_segmentation(settings, threads=max(1, int(threads or settings.threads or 1)))
        return 0
    if threads:
        settings.threads = max(1, int(threads) // nproc)
    if nproc == 1:
        from openmind_bench.downstream import finetune

        status = finetune.run(settings)
        return settings.preemption_exit_code if status == "preempted" else 0
    out = Path(settings.out_dir)
    settings_path = out / "settings.json"
    settings.write(settings_path)
    env = torchrun_env(settings.threads)
    cmd = torchrun_command(settings_path, nproc, worker="openmind_bench.downstream.worker")
    log.info("starting %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):  # SIGUSR1 would kill torchrun: pass every stop request on as SIGTERM
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if (out / "metrics.json").exists():
        return 0
    if (out / "preempted.json").exists():
        return settings.preemption_exit_code
    raise RuntimeError(f"fine-tuning into {out} failed (torchrun exit code {code}); see the log above")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m openmind_bench.downstream.worker SETTINGS_JSON", file=sys.stderr)
        return 2
    configure_worker_logging()
    from openmind_bench.downstream import finetune

    settings = FinetuneSettings.read(argv[0])
    return settings.preemption_exit_code if finetune.run(settings) == "preempted" else 0


if __name__ == "__main__":
    sys.exit(main())
