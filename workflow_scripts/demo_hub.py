"""Snakemake adapter: rule demo_hub -> openmind_bench.checkpoints.hub_cache.publish_run."""

from openmind_bench.checkpoints.hub_cache import publish_run
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    publish_run(snakemake.params.run_dir, snakemake.params.cache_dir, snakemake.params.repo_id)  # noqa: F821
