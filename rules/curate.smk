# Curation: a fingerprint per preprocessed image (one job per preprocessing shard) and per downstream
# test-case image, near-duplicate clusters and leakage pairs by content (results/curation/), then each
# named selection (config `selections`) of the preprocessed images as an nnssl pretrain_data.json (raw
# images) plus its preprocessed twin (our .b2nd files), what each step dropped and a summary.
# Logic lives in openmind_bench.curation; `openmind-bench select` / `curate` are the same stage outside Snakemake.


rule fingerprint_shard:
    input:
        manifest=f"{PREPROCESS_ROOT}/{{dataset}}/shard-{{shard}}.tsv",
    output:
        table=f"{CURATION_ROOT}/fingerprints/{{dataset}}/shard-{{shard}}.parquet",
        rejected="results/qc/parts/curation/{dataset}/{shard}.tsv",
    params:
        settings=CURATION["fingerprint"],
    resources:
        mem_mb=config["resources"]["curate"]["mem_mb"],
        runtime=config["resources"]["curate"]["runtime"],
    log:
        "logs/curate/fingerprints/{dataset}/{shard}.log",
    benchmark:
        "logs/benchmarks/curate/fingerprints/{dataset}/{shard}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/fingerprint_shard.py"


# ancient(split): a split is made once and reused (its test cases never change under it), but the split
# job runs again after a registry edit (a label renamed) and rewrites the file; that must not re-run the
# leakage check, and through it every selection and pre-training run. The data's own digest (params) and,
# for the demo, the demo sets' build (input) re-run it when the images themselves change.
rule downstream_fingerprints:
    input:
        split=ancient(downstream_split_of),
        data=downstream_data,
    output:
        table=f"{CURATION_ROOT}/downstream/{{target_dataset}}.parquet",
        rejected="results/qc/parts/curation/downstream/{target_dataset}.tsv",
    params:
        source=downstream_source_of,
        data_fingerprint=downstream_data_fingerprint,
        preprocess=config["preprocess"],
        settings=CURATION["fingerprint"],
    resources:
        mem_mb=config["resources"]["curate"]["mem_mb"],
        runtime=config["resources"]["curate"]["runtime"],
    log:
        "logs/curate/downstream/{target_dataset}.log",
    benchmark:
        "logs/benchmarks/curate/downstream/{target_dataset}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/downstream_fingerprints.py"


rule curate_content:
    input:
        tables=fingerprint_tables(),
        rejected=fingerprint_rejection_parts(),
        downstream=downstream_fingerprint_tables(),
    output:
        duplicates=DUPLICATES,
        leakage=LEAKAGE,
        unchecked=UNCHECKED,
    params:
        duplicate_distance=CURATION["duplicate_distance"],
        leakage_distance=CURATION["leakage_distance"],
        backend=CURATION["neighbours"],
    threads: CURATION["threads"]
    resources:
        mem_mb=config["resources"]["curate"]["mem_mb"],
        runtime=config["resources"]["curate"]["runtime"],
    log:
        "logs/curate/content.log",
    benchmark:
        "logs/benchmarks/curate/content.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/curate_content.py"


rule select_pretrain_data:
    input:
        unpack(selection_curation_inputs),
        index=preprocess_index_tables,
        manifests=preprocess_manifests(),
        quality=quality_tables,
    output:
        raw="results/selections/{selection}/pretrain_data.json",
        preprocessed="results/selections/{selection}/pretrain_data__preprocessed.json",
        table="results/selections/{selection}/images.tsv",
        train="results/selections/{selection}/pretrain_data__preprocessed_train.json",
        val="results/selections/{selection}/pretrain_data__preprocessed_val.json",
        dropped="results/selections/{selection}/dropped.tsv",
        summary="results/selections/{selection}/summary.json",
        plot=report(
            "results/selections/{selection}/summary.png",
            caption="../report/selection_summary.rst",
            category="Selections",
            labels={"selection": "{selection}"},
        ),
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
