"""Snakemake adapter: rule pretrain -> openmind_bench.pretrain.worker.launch (torchrun inside)."""

import sys

from openmind_bench.logs import log_to
from openmind_bench.pretrain.settings import PretrainSettings
from openmind_bench.pretrain.worker import launch

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    code = launch(
        PretrainSettings.from_dict(snakemake.params.settings),
        nproc=max(1, int(snakemake.resources.gpu)),
        threads=snakemake.threads,
    )
# After a preemption the checkpoint is written and the output is missing: Snakemake reruns the job
# (--retries, or SLURM requeue), which continues from checkpoint_latest.pt.
sys.exit(code)
