"""Snakemake adapter: rule masks_image -> openmind_bench.masks.shard.remake_mask."""

from openmind_bench.logs import log_to
from openmind_bench.masks.shard import remake_mask

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    remake_mask(list(snakemake.input.tables), snakemake.input.table, snakemake.wildcards.dataset,
                snakemake.output.mask, dict(snakemake.params.settings))
