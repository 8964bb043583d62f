"""Snakemake adapter: rule fetch_dataset -> openmind_bench.sources.fetch_dataset."""

from openmind_bench.logs import log_to
from openmind_bench.qc import Rejections
from openmind_bench.sources import fetch_dataset

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    rejections = Rejections("fetch")
    fetch_dataset(
        dict(snakemake.params.source),
        snakemake.wildcards.dataset,
        snakemake.params.snapshot,
        snakemake.params.dest,
        snakemake.output.manifest,
        rejections,
    )
    rejections.write(snakemake.output.rejected)
