"""One classification fine-tuning process: `python -m openmind_bench.downstream.worker SETTINGS_JSON`,
started by torchrun through the engine's launcher (one process per GPU, or one on a CPU). Exit code 0 when done,
`preemption_exit_code` after a SIGTERM/SIGUSR1 checkpoint (rerun to continue), 1 on errors."""

from __future__ import annotations

import logging
import sys

from openmind_bench.downstream.settings import FinetuneSettings, run_record
from openmind_bench.engine import launch as engine_launch
from openmind_bench.engine.checkpoint import FINAL, LATEST, PREEMPTED
from openmind_bench.names import METRICS_FILE

log = logging.getLogger(__name__)

WORKER = "openmind_bench.downstream.worker"
# What a classification run leaves in its folder (kept only for a run with the same record).
STATE = (FINAL, LATEST, "progress.csv", "tensorboard", "settings.json", "schedule.json", "metrics.csv",
         "compute.json", "cases")  # cases: classification.CASES, the preprocessed training cases


def is_segmentation(settings: FinetuneSettings) -> bool:
    from openmind_bench.registry import load_registry

    return load_registry(settings.registry, settings.root).get(settings.dataset).task == "seg"


def _run(settings: FinetuneSettings) -> str:
    from openmind_bench.downstream import classification

    return classification.run(settings)


def main(argv: list[str] | None = None) -> int:
    return engine_launch.worker_main(argv, WORKER, FinetuneSettings.read, _run)


def launch(settings: FinetuneSettings, nproc: int = 1, *, threads: int = 0) -> int:
    """Fine-tune and evaluate into `settings.out_dir` (what the rule and `openmind-bench finetune` call):
    segmentation inside nnU-Net v2 (one GPU, as the papers), classification on the shared engine,
    linear_probe / knn runs in this process (downstream.probes)."""
    from openmind_bench.downstream import probes
    from openmind_bench.downstream.splits import ensure_run_subset
    from openmind_bench.names import parse_run

    ensure_run_subset(settings)  # before the run's record, which holds its sha256
    if probes.is_probe(parse_run(settings.run).schedule):  # no training: one process, no torchrun
        settings.threads = int(threads or settings.threads)
        probes.run(settings)
        return 0
    if is_segmentation(settings):
        from openmind_bench.downstream.nnunet.run import finetune_segmentation

        if int(nproc) > 1:
            log.warning("nnU-Net fine-tuning runs on one GPU (as the papers'); %d requested", nproc)
        finetune_segmentation(settings, threads=max(1, int(threads or settings.threads or 1)))
        return 0
    return engine_launch.launch(settings, worker=WORKER, done=METRICS_FILE, preempted=PREEMPTED,
                                record=run_record(settings), state=STATE, nproc=nproc, threads=threads,
                                label="fine-tuning")


if __name__ == "__main__":
    sys.exit(main())
