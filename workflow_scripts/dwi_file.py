"""Snakemake adapter: rule dwi_file -> openmind_bench.dwi.shard.remake_file."""

from openmind_bench.dwi.derive import DwiSettings
from openmind_bench.dwi.shard import remake_file
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    remake_file(
        snakemake.input.index,
        snakemake.input.table,
        snakemake.wildcards.dataset,
        snakemake.output.file,
        DwiSettings.from_config(dict(snakemake.params.settings)),
        scratch=getattr(snakemake.resources, "tmpdir", None),  # noqa: F821
    )
