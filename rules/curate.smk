# Curation: each named selection (config `selections`) of the preprocessed images becomes an
# nnssl pretrain_data.json (raw images) plus its preprocessed twin (our .b2nd files).
# Logic lives in openmind_bench.curation; `openmind-bench select` is the same stage outside Snakemake.


rule select_pretrain_data:
    input:
        index=preprocess_index_tables,
        manifests=preprocess_manifests(),
        quality=quality_tables,
    output:
        raw="results/selections/{selection}/pretrain_data.json",
        preprocessed="results/selections/{selection}/pretrain_data__preprocessed.json",
        table="results/selections/{selection}/images.tsv",
        train="results/selections/{selection}/pretrain_data__preprocessed_train.json",
        val="results/selections/{selection}/pretrain_data__preprocessed_val.json",
    params:
        selection=selection_settings,
        collection_index=selection_collection_index,
        # downstream test subjects on OpenNeuro (registry): an edit of them re-makes the selection
        excluded_subjects=selection_excluded_subjects,
    resources:
        mem_mb=config["resources"]["curate"]["mem_mb"],
        runtime=config["resources"]["curate"]["runtime"],
    log:
        "logs/curate/{selection}.log",
    benchmark:
        "logs/benchmarks/curate/{selection}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/select_pretrain_data.py"
