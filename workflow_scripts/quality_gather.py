"""Snakemake adapter: rule quality_gather -> openmind_bench.quality.shard.gather_quality."""

from openmind_bench.logs import log_to
from openmind_bench.quality.shard import gather_quality

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    gather_quality(list(snakemake.input.parts), snakemake.output.table, dict(snakemake.params.settings))
