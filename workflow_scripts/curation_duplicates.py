"""Snakemake adapter: rule duplicates -> openmind_bench.curation.content.run_duplicates."""

from openmind_bench.curation.content import run_duplicates
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    run_duplicates(list(snakemake.input.tables), snakemake.output.clusters, snakemake.params.threshold,
                   backend=snakemake.params.backend, threads=snakemake.threads)
