"""One pre-training process: `python -m openmind_bench.pretrain.worker SETTINGS_JSON`, started by
torchrun (or alone, as a single process). Exit code 0 when done, `preemption_exit_code` after a
SIGTERM/SIGUSR1 checkpoint, 1 on errors."""

from __future__ import annotations

import sys

from openmind_bench.engine import checkpoint, launch as engine_launch
from openmind_bench.pretrain.settings import STATE, PretrainSettings, run_record

WORKER = "openmind_bench.pretrain.worker"


def _run(settings: PretrainSettings) -> str:
    from openmind_bench.pretrain import trainer

    return trainer.run(settings).status


def main(argv: list[str] | None = None) -> int:
    return engine_launch.worker_main(argv, WORKER, PretrainSettings.read, _run)


def launch(settings: PretrainSettings, nproc: int = 1, *, threads: int = 0, nodes: int = 1, gpus: bool = False) -> int:
    """Pre-train into `settings.out_dir` under torchrun (what the rule and `openmind-bench pretrain` call):
    `nproc` processes on each of `nodes` nodes (several: inside a SLURM job)."""
    return engine_launch.launch(settings, worker=WORKER, done=checkpoint.FINAL, preempted=checkpoint.PREEMPTED,
                                record=run_record(settings), state=STATE, nproc=nproc, threads=threads,
                                label="pre-training", nodes=nodes, gpus=gpus)


if __name__ == "__main__":
    sys.exit(main())
