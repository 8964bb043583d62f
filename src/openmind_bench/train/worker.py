"""One pre-training process: `python -m openmind_bench.train.worker SETTINGS_JSON`, started by torchrun
(or alone, as a single process). Exit code 0 when done, `preemption_exit_code` after a SIGTERM/SIGUSR1
checkpoint, 1 on errors."""

from __future__ import annotations

import sys

from openmind_bench.train.launch import configure_worker_logging
from openmind_bench.train.settings import PretrainSettings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m openmind_bench.train.worker SETTINGS_JSON", file=sys.stderr)
        return 2
    configure_worker_logging()
    from openmind_bench.train import trainer

    settings = PretrainSettings.read(argv[0])
    outcome = trainer.run(settings)
    return settings.preemption_exit_code if outcome.status == "preempted" else 0


if __name__ == "__main__":
    sys.exit(main())
