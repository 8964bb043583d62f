"""Snakemake adapter: rule checkpoint_scores -> openmind_bench.aggregate.scorecard.write_scorecard."""

from openmind_bench.aggregate.scorecard import write_scorecard
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    write_scorecard(list(snakemake.input.metrics), snakemake.wildcards.checkpoint,  # noqa: F821
                    snakemake.output.csv, snakemake.output.md,  # noqa: F821
                    registry=snakemake.input.registry[0] if len(snakemake.input.registry) else None)  # noqa: F821
