# Aggregation: fine-tuning results -> benchmark table, rank stability, figures.
# Logic lives in openmind_bench.aggregate; `openmind-bench collect-results` + `openmind-bench aggregate`
# are the same stage outside Snakemake.
#
# Two rules write the same tables (docs/architecture.md, "Aggregation"):
# - `benchmark_table_of_config` (the one `all` and any path target use) depends on exactly the runs
#   the config asks for, so `snakemake all` ends in the tables;
# - `benchmark_table`, named as a target (`snakemake benchmark_table`), gathers whatever metrics.json
#   exist under results/downstream/ and forces no missing run.


ruleorder: benchmark_table_of_config > benchmark_table


rule benchmark_table:
    input:
        metrics=metrics_on_disk,
        registry=registry_if_present,
        leakage=leakage_if_present,
    output:
        results=f"{omb_names.BENCHMARK_DIR}/results_long.csv",
        table_csv=report(
            BENCHMARK_OUTPUTS["table_csv"],
            caption="../report/benchmark_table.rst",
            category="Benchmark",
            subcategory="Tables",
        ),
        table_md=report(
            BENCHMARK_OUTPUTS["table_md"],
            caption="../report/benchmark_table.rst",
            category="Benchmark",
            subcategory="Tables",
        ),
        table_tex=BENCHMARK_OUTPUTS["table_tex"],
        ranks=report(
            BENCHMARK_OUTPUTS["ranks"],
            caption="../report/ranks_bootstrap.rst",
            category="Benchmark",
            subcategory="Rank stability",
        ),
        intervals=report(
            BENCHMARK_OUTPUTS["intervals"],
            caption="../report/bootstrap_intervals.rst",
            category="Benchmark",
            subcategory="Rank stability",
        ),
        deltas=report(
            BENCHMARK_OUTPUTS["deltas"],
            caption="../report/delta_scratch_intervals.rst",
            category="Benchmark",
            subcategory="Rank stability",
        ),
        compute=report(
            BENCHMARK_OUTPUTS["compute"],
            caption="../report/compute.rst",
            category="Benchmark",
            subcategory="Compute",
        ),
        plots=report(
            directory(BENCHMARK_OUTPUTS["plots"]),
            patterns=["{name}.png"],
            caption="../report/benchmark_plots.rst",
            category="Benchmark",
            subcategory="Figures",
        ),
    params:
        bootstrap_samples=config["aggregate"]["bootstrap_samples"],
        seed=config["aggregate"]["seed"],
    resources:
        mem_mb=config["resources"]["aggregate"]["mem_mb"],
        runtime=config["resources"]["aggregate"]["runtime"],
    log:
        "logs/aggregate/benchmark_table.log",
    benchmark:
        "logs/benchmarks/aggregate/benchmark_table.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/aggregate.py"


use rule benchmark_table as benchmark_table_of_config with:
    input:
        metrics=metrics_of_config,
        registry=registry_if_present,
        # the footnote's count of pre-training images excluded as copies of downstream test cases
        leakage=leakage_of_config,
    log:
        "logs/aggregate/benchmark_table_of_config.log",
    benchmark:
        "logs/benchmarks/aggregate/benchmark_table_of_config.tsv"
