# Aggregation: every fine-tuning result on disk -> benchmark table, rank stability, figures.
# Logic lives in openmind_bench.aggregate; `openmind-bench aggregate` is the same stage outside Snakemake.

from openmind_bench.aggregate.collect import if_exists, metrics_on_disk


rule benchmark_table:
    input:
        # Globs what exists (DESIGN, section 5: the table reads whatever is there) rather than
        # asking for missing runs; `all` depends on the full set through its own input function.
        metrics=metrics_on_disk("results/downstream"),
        registry=if_exists(
            lookup(dpath="downstream_registry", within=config, default="config/downstream_datasets.yaml")
        ),
    output:
        results="results/benchmark/results_long.csv",
        table_csv=report(
            "results/benchmark/benchmark_table.csv",
            caption="../report/benchmark_table.rst",
            category="Benchmark",
            subcategory="Tables",
        ),
        table_md=report(
            "results/benchmark/benchmark_table.md",
            caption="../report/benchmark_table.rst",
            category="Benchmark",
            subcategory="Tables",
        ),
        table_tex="results/benchmark/benchmark_table.tex",
        ranks=report(
            "results/benchmark/ranks_bootstrap.csv",
            caption="../report/ranks_bootstrap.rst",
            category="Benchmark",
            subcategory="Rank stability",
        ),
        intervals=report(
            "results/benchmark/bootstrap_intervals.csv",
            caption="../report/bootstrap_intervals.rst",
            category="Benchmark",
            subcategory="Rank stability",
        ),
        plots=report(
            directory("results/benchmark/plots"),
            patterns=["{name}.png"],
            caption="../report/benchmark_plots.rst",
            category="Benchmark",
            subcategory="Figures",
        ),
    params:
        bootstrap_samples=lookup(dpath="aggregate/bootstrap_samples", within=config, default=1000),
        seed=lookup(dpath="aggregate/seed", within=config, default=0),
    log:
        "logs/aggregate/benchmark_table.log",
    benchmark:
        "logs/benchmarks/aggregate/benchmark_table.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/aggregate.py"
