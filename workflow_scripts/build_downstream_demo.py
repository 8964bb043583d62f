"""Snakemake adapter: rule demo_downstream -> openmind_bench.demo.downstream.build_downstream."""

from openmind_bench.demo.downstream import build_downstream
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    build_downstream(snakemake.params.root, seed=snakemake.params.seed, resolution=snakemake.params.resolution,
                     cohort_repeats=snakemake.params.cohort_repeats)
