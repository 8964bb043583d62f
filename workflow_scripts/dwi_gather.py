"""Snakemake adapter: rule dwi_gather -> openmind_bench.dwi.shard.gather."""

from openmind_bench.dwi.shard import gather
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    gather(list(snakemake.input.tables), snakemake.output.table)
