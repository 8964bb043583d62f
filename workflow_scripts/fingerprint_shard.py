"""Snakemake adapter: rule fingerprint_shard -> openmind_bench.curation.fingerprints.run_fingerprint_shard."""

from openmind_bench.curation.fingerprint import FingerprintSettings
from openmind_bench.curation.fingerprints import run_fingerprint_shard
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    run_fingerprint_shard(
        snakemake.input.manifest,
        snakemake.output.table,
        snakemake.output.rejected,
        FingerprintSettings.from_config(dict(snakemake.params.settings)),
    )
