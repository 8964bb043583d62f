"""Snakemake adapter: rule gather_index -> openmind_bench.bids.index.gather."""

from openmind_bench.bids.index import gather
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    gather(
        list(snakemake.input.tables),
        snakemake.output.images,
        snakemake.output.shards,
        expected=dict(snakemake.params.expected),
        n_shards=dict(snakemake.params.n_shards),
    )
