# Quality: MRIQC's no-reference metrics and an image score per (dataset, shard) of the masked index,
# then results/quality/iqs.parquet with the per-group (dataset x modality x derivation) and final scores.
# Logic lives in openmind_bench.quality; `openmind-bench quality` is the same stage outside Snakemake.


rule quality_shard:
    input:
        index=MASKED_INDEX,
    output:
        part="results/quality/parts/{dataset}/shard-{shard}.parquet",
        rejected="results/qc/parts/quality/{dataset}/{shard}.tsv",
    params:
        settings=QUALITY_SHARD_SETTINGS,
    resources:
        mem_mb=config["resources"]["quality"]["mem_mb"],
        runtime=config["resources"]["quality"]["runtime"],
    log:
        "logs/quality/{dataset}/{shard}.log",
    benchmark:
        "logs/benchmarks/quality/{dataset}/{shard}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/quality_shard.py"


rule quality_gather:
    input:
        parts=quality_parts(),
    output:
        table="results/quality/iqs.parquet",
    params:
        settings=QUALITY_GATHER_SETTINGS,
    resources:
        mem_mb=config["resources"]["quality"]["mem_mb"],
        runtime=config["resources"]["quality"]["runtime"],
    log:
        "logs/quality/quality_gather.log",
    benchmark:
        "logs/benchmarks/quality/quality_gather.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/quality_gather.py"
