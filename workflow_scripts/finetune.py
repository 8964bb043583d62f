"""Snakemake adapter: rule finetune -> openmind_bench.downstream.worker.launch (torchrun on several GPUs)."""

import sys

from openmind_bench.downstream.settings import FinetuneSettings
from openmind_bench.downstream.worker import launch
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    code = launch(
        FinetuneSettings.from_dict(snakemake.params.settings),
        nproc=max(1, int(snakemake.resources.gpu)),
        threads=snakemake.threads,
    )
# After a preemption the checkpoint is written and metrics.json is missing: Snakemake reruns the job.
sys.exit(code)
