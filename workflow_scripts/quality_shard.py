"""Snakemake adapter: rule quality_shard -> openmind_bench.quality.shard.run_quality_shard."""

from openmind_bench.logs import log_to
from openmind_bench.quality.shard import run_quality_shard

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    run_quality_shard([snakemake.input.index], snakemake.wildcards.dataset, int(snakemake.wildcards.shard),
                      snakemake.output.part, snakemake.output.rejected, dict(snakemake.params.settings))
