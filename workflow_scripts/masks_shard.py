"""Snakemake adapter: rule masks_shard -> openmind_bench.masks.shard.run_masks_shard."""

from openmind_bench.logs import log_to
from openmind_bench.masks.shard import run_masks_shard

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    run_masks_shard(list(snakemake.input.tables), snakemake.wildcards.dataset, int(snakemake.wildcards.shard),
                    snakemake.params.out_root, snakemake.output.table, snakemake.output.rejected,
                    dict(snakemake.params.settings))
