"""Snakemake adapter for rule benchmark_table: collect metrics.json files, then aggregate."""

import sys
from pathlib import Path

sys.path.insert(0, f"{snakemake.scriptdir}/../src")  # noqa: F821  this checkout's package, also under --sdm conda

from openmind_bench.aggregate import OUTPUT_NAMES, run
from openmind_bench.aggregate.collect import write_results
from openmind_bench.logs import log_to


def main(smk) -> None:
    with log_to(smk.log[0]):
        out = Path(smk.output.table_csv).parent
        # The package writes fixed names into one folder: the rule must declare exactly those.
        for key, name in OUTPUT_NAMES.items():
            if Path(getattr(smk.output, key)) != out / name:
                raise ValueError(f"output {key} must be {out / name}, the rule declares {getattr(smk.output, key)}")
        write_results(list(smk.input.metrics), smk.output.results)
        registry = smk.input.registry[0] if len(smk.input.registry) else None
        run(
            smk.output.results,
            out,
            registry=registry,
            bootstrap_samples=int(smk.params.bootstrap_samples),
            seed=int(smk.params.seed),
        )


main(snakemake)  # noqa: F821 - injected by Snakemake
