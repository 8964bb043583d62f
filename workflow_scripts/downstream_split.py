"""Snakemake adapter: rule downstream_split -> openmind_bench.downstream.splits.ensure_split (+ the
dataset's rejected cases as a QC part)."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../src")  # noqa: F821  this checkout's package, also under --sdm conda

from openmind_bench.downstream.readers import case_table, read_dataset
from openmind_bench.downstream.registry import load_registry
from openmind_bench.downstream.splits import SplitSettings, ensure_split
from openmind_bench.logs import log_to
from openmind_bench.qc import Rejections

with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    spec = load_registry(snakemake.params.registry, snakemake.params.root).get(snakemake.wildcards.target_dataset)
    data = read_dataset(spec)
    rejections = Rejections("downstream")
    data.record_rejections(rejections)
    rejections.write(snakemake.output.rejected)
    settings = dict(snakemake.params.split_settings)
    if spec.role != "dev":
        settings["folds"] = 0  # test-role datasets: the fixed split only (as `openmind-bench downstream-splits`)
    ensure_split(snakemake.output.split, case_table(data), spec.name, spec.role, SplitSettings(**settings))
