"""Snakemake adapter: rule finetune -> openmind_bench.downstream.worker.launch (nnU-Net v2 for
segmentation datasets, torchrun on several GPUs for classification)."""

import sys

from openmind_bench.downstream.settings import FinetuneSettings
from openmind_bench.downstream.worker import launch
from openmind_bench.logs import log_to

if __name__ == "__main__":  # nnU-Net starts worker processes: they must not rerun this job
    with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
        code = launch(
            FinetuneSettings.from_dict(snakemake.params.settings),  # noqa: F821
            nproc=max(1, int(snakemake.resources.gpu)),  # noqa: F821
            threads=snakemake.threads,  # noqa: F821
        )
    # After a preemption the checkpoint is written and metrics.json is missing: Snakemake reruns the job.
    sys.exit(code)
