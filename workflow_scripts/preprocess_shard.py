"""Snakemake adapter: rule preprocess_shard -> openmind_bench.preprocess.shard.run_preprocess_shard."""

from openmind_bench.logs import log_to
from openmind_bench.preprocess.image import PreprocessSettings
from openmind_bench.preprocess.shard import run_preprocess_shard

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    run_preprocess_shard(
        list(snakemake.input.index),
        snakemake.wildcards.dataset,
        int(snakemake.wildcards.shard),
        snakemake.params.out_root,
        snakemake.output.manifest,
        snakemake.output.rejected,
        PreprocessSettings.from_config(dict(snakemake.params.settings)),
    )
