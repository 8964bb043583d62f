"""Snakemake adapter: rule qc_rejected -> openmind_bench.qc.gather."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../src")  # noqa: F821  this checkout's package, also under --sdm conda

from openmind_bench.logs import log_to
from openmind_bench.qc import gather

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    gather(list(snakemake.input.parts), snakemake.output.table)
