"""Snakemake adapter: rule pretrain -> openmind_bench.pretrain.worker.launch (torchrun inside)."""

import sys

from openmind_bench.logs import log_to
from openmind_bench.pretrain.settings import PretrainSettings, job_shape
from openmind_bench.pretrain.worker import launch

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    nodes, nproc, gpus = job_shape(snakemake.resources)  # noqa: F821
    code = launch(
        PretrainSettings.from_dict(snakemake.params.settings),  # noqa: F821
        nproc=nproc,
        nodes=nodes,
        gpus=gpus,
        threads=snakemake.threads,  # noqa: F821 (per node)
    )
# After a preemption the checkpoint is written and the output is missing: Snakemake reruns the job
# (--retries, or SLURM requeue), which continues from checkpoint_latest.pt.
sys.exit(code)
