# The rejection record of the whole run: every job's part, concatenated.
# Logic lives in openmind_bench.qc; `openmind-bench qc-gather` is the same step outside Snakemake.


localrules:
    qc_rejected,


rule qc_rejected:
    input:
        parts=rejection_parts(),
    output:
        table="results/qc/rejected.tsv",
    resources:
        mem_mb=config["resources"]["qc"]["mem_mb"],
        runtime=config["resources"]["qc"]["runtime"],
    log:
        "logs/qc/qc_rejected.log",
    benchmark:
        "logs/benchmarks/qc/qc_rejected.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/qc_rejected.py"
