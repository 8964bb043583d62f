# DWI derivation: one job per (dataset, shard) of the index turns the shard's 4D DWI scans into
# T2w/ADC/FA maps (a BIDS derivatives tree under results/derivatives/dwi/{dataset}/), then a gather
# lists them in results/index/dwi.parquet, a table with the columns of results/index/images.parquet
# that preprocessing reads beside the index (IMAGE_TABLES in rules/helpers/masks.smk: masks, quality and preprocessing read it like the index).
# The shard job is a checkpoint: once it has run, `all` lists the derived files its table names that no
# longer exist, and `dwi_file` re-makes such a file (or any one named as a target) alone.
# Logic lives in openmind_bench.dwi; `openmind-bench dwi` is the same stage outside Snakemake.

checkpoint dwi_shard:
    input:
        index="results/index/images.parquet",
    output:
        table="results/dwi/tables/{dataset}/shard-{shard}.parquet",
        status="results/dwi/status/{dataset}/shard-{shard}.tsv",
        rejected="results/qc/parts/dwi/{dataset}/{shard}.tsv",
    params:
        deriv_root=DWI_ROOT,
        settings=config["dwi"],
    resources:
        mem_mb=config["resources"]["dwi"]["mem_mb"],
        runtime=config["resources"]["dwi"]["runtime"],
    log:
        "logs/dwi/{dataset}/{shard}.log",
    benchmark:
        "logs/benchmarks/dwi/{dataset}/{shard}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/dwi_shard.py"


# ancient(): the shard wrote the file before its table; a shard whose inputs changed runs again as a whole.
rule dwi_file:
    input:
        index=ancient("results/index/images.parquet"),
        table=ancient(dwi_table_of_file),
    output:
        file=f"{DWI_ROOT}/{{dataset}}/{{dwi_dir}}/dwi/{{dwi_stem}}_desc-{{dwi_desc}}.{{dwi_ext}}",
    params:
        settings=config["dwi"],
    resources:
        mem_mb=config["resources"]["dwi"]["mem_mb"],
        runtime=config["resources"]["dwi"]["runtime"],
    log:
        "logs/dwi/{dataset}/{dwi_dir}/{dwi_stem}_desc-{dwi_desc}.{dwi_ext}.log",
    benchmark:
        "logs/benchmarks/dwi/{dataset}/{dwi_dir}/{dwi_stem}_desc-{dwi_desc}.{dwi_ext}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/dwi_file.py"


rule dwi_gather:
    input:
        tables=DWI_SHARD_TABLES,
    output:
        table="results/index/dwi.parquet",
    log:
        "logs/dwi/dwi_gather.log",
    benchmark:
        "logs/benchmarks/dwi/dwi_gather.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/dwi_gather.py"
