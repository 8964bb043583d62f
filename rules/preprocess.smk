# Preprocessing: one job per (dataset, shard) writes its images into the blosc2 store under
# results/preprocessed/{dataset}/sub-*/ses-*/ and lists them in a shard manifest (the images of
# a shard are known only from the data, so the manifest is the declared output).
# Logic lives in openmind_bench.preprocess; `openmind-bench preprocess` is the same stage outside Snakemake.


rule preprocess_shard:
    input:
        index=preprocess_index_tables,
    output:
        manifest=f"{PREPROCESS_ROOT}/{{dataset}}/shard-{{shard}}.tsv",
        rejected="results/qc/parts/preprocess/{dataset}/{shard}.tsv",
    params:
        out_root=subpath(output.manifest, ancestor=2),
        settings=config["preprocess"],
    resources:
        mem_mb=config["resources"]["preprocess"]["mem_mb"],
        runtime=config["resources"]["preprocess"]["runtime"],
    log:
        "logs/preprocess/{dataset}/{shard}.log",
    benchmark:
        "logs/benchmarks/preprocess/{dataset}/{shard}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/preprocess_shard.py"
