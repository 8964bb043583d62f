"""Snakemake adapter: rule downstream_fingerprints -> openmind_bench.curation.fingerprints.run_downstream_fingerprints."""

from openmind_bench.curation.fingerprint import FingerprintSettings
from openmind_bench.curation.fingerprints import run_downstream_fingerprints
from openmind_bench.logs import log_to
from openmind_bench.preprocess.image import PreprocessSettings

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    run_downstream_fingerprints(
        snakemake.input.split,
        snakemake.wildcards.target_dataset,
        snakemake.params.source,
        snakemake.output.table,
        snakemake.output.rejected,
        PreprocessSettings.from_config(dict(snakemake.params.preprocess)),
        FingerprintSettings.from_config(dict(snakemake.params.settings)),
    )
