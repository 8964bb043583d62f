"""Snakemake adapter: rule demo_mirror -> openmind_bench.demo.build_demo."""

from openmind_bench.demo import build_demo
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    build_demo(
        snakemake.params.root,
        seed=snakemake.params.seed,
        resolution=snakemake.params.resolution,
        inject_faults=snakemake.params.inject_faults,
    )
