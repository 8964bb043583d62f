"""Snakemake adapter for the benchmark table rules -> openmind_bench.aggregate.benchmark_table."""

from pathlib import Path

from openmind_bench.aggregate import OUTPUT_NAMES, benchmark_table
from openmind_bench.logs import log_to


def main(smk) -> None:
    with log_to(smk.log[0]):
        out = Path(smk.output.table_csv).parent
        # The package writes fixed names into one folder: the rule must declare exactly those.
        for key, name in OUTPUT_NAMES.items():
            if Path(getattr(smk.output, key)) != out / name:
                raise ValueError(f"output {key} must be {out / name}, the rule declares {getattr(smk.output, key)}")
        benchmark_table(
            list(smk.input.metrics),
            out,
            registry=smk.input.registry[0] if len(smk.input.registry) else None,
            bootstrap_samples=int(smk.params.bootstrap_samples),
            seed=int(smk.params.seed),
            results_csv=smk.output.results,
            leakage=smk.input.leakage[0] if len(smk.input.leakage) else None,
        )


main(snakemake)  # noqa: F821 - injected by Snakemake
