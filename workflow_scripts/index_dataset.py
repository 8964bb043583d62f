"""Snakemake adapter: rule index_dataset -> openmind_bench.bids.index.run_index."""

from openmind_bench.bids.index import run_index
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    run_index(
        snakemake.wildcards.dataset,
        snakemake.input.manifest,
        snakemake.output.table,
        snakemake.output.rejected,
        n_shards=snakemake.params.n_shards,
        modalities=list(snakemake.params.modalities),
        verify_data=snakemake.params.verify_data,
    )
