"""Snakemake adapter: rule curate_content -> openmind_bench.curation.content.run_content."""

from openmind_bench.curation.content import run_content
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    run_content(
        list(snakemake.input.tables),  # noqa: F821
        list(snakemake.input.rejected),  # noqa: F821
        list(snakemake.input.downstream),  # noqa: F821
        snakemake.output.duplicates,  # noqa: F821
        snakemake.output.leakage,  # noqa: F821
        snakemake.output.unchecked,  # noqa: F821
        snakemake.params.duplicate_distance,  # noqa: F821
        snakemake.params.leakage_distance,  # noqa: F821
        backend=snakemake.params.backend,  # noqa: F821
        threads=snakemake.threads,  # noqa: F821
    )
