"""Snakemake adapter: rule qc_rejected -> openmind_bench.qc.gather."""

from openmind_bench.logs import log_to
from openmind_bench.qc import gather

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    gather(list(snakemake.input.parts), snakemake.output.table)
