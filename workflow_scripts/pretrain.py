"""Snakemake adapter: rule pretrain -> openmind_bench.train.launch.launch (torchrun inside)."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../src")  # noqa: F821  this checkout's package, also under --sdm conda

from openmind_bench.logs import log_to
from openmind_bench.train.launch import launch
from openmind_bench.train.settings import PretrainSettings

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    code = launch(
        PretrainSettings.from_dict(snakemake.params.settings),
        nproc=max(1, int(snakemake.resources.gpu)),
        threads=snakemake.threads,
    )
# After a preemption the checkpoint is written and the output is missing: Snakemake reruns the job
# (--retries, or SLURM requeue), which continues from checkpoint_latest.pt.
sys.exit(code)
