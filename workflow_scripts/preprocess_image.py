"""Snakemake adapter: rule preprocess_image -> openmind_bench.preprocess.shard.remake_image."""

from openmind_bench.logs import log_to
from openmind_bench.preprocess.image import PreprocessSettings
from openmind_bench.preprocess.shard import remake_image

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    remake_image(
        list(snakemake.input.index),
        snakemake.input.manifest,
        snakemake.wildcards.dataset,
        snakemake.wildcards.image_id,
        snakemake.params.out_root,
        PreprocessSettings.from_config(dict(snakemake.params.settings)),
    )
