"""Snakemake adapter: rule dwi_shard -> openmind_bench.dwi.shard.run_dwi_shard."""

from openmind_bench.dwi.derive import DwiSettings
from openmind_bench.dwi.shard import run_dwi_shard
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    run_dwi_shard(
        snakemake.input.index,
        snakemake.wildcards.dataset,
        int(snakemake.wildcards.shard),
        snakemake.params.deriv_root,
        snakemake.output.table,
        snakemake.output.status,
        snakemake.output.rejected,
        DwiSettings.from_config(dict(snakemake.params.settings)),
        scratch=getattr(snakemake.resources, "tmpdir", None),  # noqa: F821
    )
