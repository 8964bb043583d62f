"""Snakemake adapter: rule leakage -> openmind_bench.curation.content.run_leakage."""

from openmind_bench.curation.content import run_leakage
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    run_leakage(list(snakemake.input.tables), list(snakemake.input.downstream), snakemake.output.pairs,
                snakemake.params.threshold, backend=snakemake.params.backend, threads=snakemake.threads)
