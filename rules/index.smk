# BIDS index: one job per dataset, then a gather into results/index/images.parquet.
# Logic lives in openmind_bench.bids and openmind_bench.metadata; `openmind-bench index` is the same stage.


rule index_dataset:
    input:
        manifest=raw_manifest,
    output:
        table="results/index/datasets/{dataset}.parquet",
        rejected="results/qc/parts/index/{dataset}.tsv",
    params:
        n_shards=n_shards_of,
        modalities=config["index"]["modalities"],
        verify_data=config["index"]["verify_data"],
    resources:
        mem_mb=config["resources"]["index"]["mem_mb"],
        runtime=config["resources"]["index"]["runtime"],
    log:
        "logs/index/{dataset}.log",
    benchmark:
        "logs/benchmarks/index/{dataset}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/index_dataset.py"


rule gather_index:
    input:
        tables=expand(rules.index_dataset.output.table, dataset=DATASETS),
    output:
        images="results/index/images.parquet",
        shards="results/index/shards.tsv",
    params:
        n_shards=N_SHARDS,
        expected={d: int(DATASET_TABLE.loc[d, "expected_images"]) for d in DATASETS},
    resources:
        mem_mb=config["resources"]["gather"]["mem_mb"],
        runtime=config["resources"]["gather"]["runtime"],
    log:
        "logs/index/gather_index.log",
    benchmark:
        "logs/benchmarks/index/gather_index.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/gather_index.py"
