"""Snakemake adapter: rule demo_mirror -> openmind_bench.demo.build_demo."""

from openmind_bench.demo import build_demo
from openmind_bench.demo.builder import leak_source
from openmind_bench.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    leak = snakemake.params.leak  # noqa: F821
    build_demo(
        snakemake.params.root,  # noqa: F821
        seed=snakemake.params.seed,  # noqa: F821
        resolution=snakemake.params.resolution,  # noqa: F821
        inject_faults=snakemake.params.inject_faults,  # noqa: F821
        plant_duplicates=snakemake.params.plant_duplicates,  # noqa: F821
        leak=leak_source(snakemake.input.leak_split[0], leak["source"], leak["dataset"], leak["modality"])  # noqa: F821
        if leak else None,
    )
