"""Snakemake adapter: rule merge_masks -> openmind_bench.masks.shard.merge_index."""

from openmind_bench.logs import log_to
from openmind_bench.masks.shard import merge_index

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    merge_index(list(snakemake.input.tables), list(snakemake.input.masks), snakemake.output.index)
