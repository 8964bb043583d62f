"""Snakemake adapter: rule downstream_split -> openmind_bench.downstream.splits.split_dataset."""

from openmind_bench.downstream.splits import SplitSettings, split_dataset
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    split_dataset(
        snakemake.params.registry,  # noqa: F821
        snakemake.params.root,  # noqa: F821
        snakemake.wildcards.target_dataset,  # noqa: F821
        SplitSettings(**snakemake.params.split_settings),  # noqa: F821
        split_out=snakemake.output.split,  # noqa: F821
        rejected_out=snakemake.output.rejected,  # noqa: F821
    )
