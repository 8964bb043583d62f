# Masks: one job per (dataset, shard) writes an anatomy and an anonymisation mask for every 3D image of
# the image tables (image_tables() in common.smk: the index, plus tables later stages append to
# IMAGE_TABLES, e.g. DWI-derived maps);
# merge_masks joins them onto those tables as the index preprocessing reads. The shard job is a
# checkpoint: once it has run, `all` lists the mask files its table names that no longer exist, and
# `masks_image` re-makes such a file (or any one named as a target) alone, checked against the table.
# Logic lives in openmind_bench.masks; `openmind-bench masks` is the same stage outside Snakemake.


checkpoint masks_shard:
    input:
        tables=image_tables,
    output:
        table="results/masks/{dataset}/shard-{shard}.parquet",
        rejected="results/qc/parts/masks/{dataset}/{shard}.tsv",
    params:
        out_root=subpath(output.table, ancestor=2),
        settings=config["masks"],
    resources:
        mem_mb=config["resources"]["masks"]["mem_mb"],
        runtime=config["resources"]["masks"]["runtime"],
    log:
        "logs/masks/{dataset}/{shard}.log",
    benchmark:
        "logs/benchmarks/masks/{dataset}/{shard}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/masks_shard.py"


rule merge_masks:
    input:
        tables=image_tables,
        masks=mask_tables(),
    output:
        index=MASKED_INDEX,
    resources:
        mem_mb=config["resources"]["masks"]["mem_mb"],
        runtime=config["resources"]["masks"]["runtime"],
    log:
        "logs/masks/merge_masks.log",
    benchmark:
        "logs/benchmarks/masks/merge_masks.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/merge_masks.py"


# ancient(): the shard wrote the mask before its table, and a shard whose inputs changed runs again as a whole.
rule masks_image:
    input:
        tables=ancient(image_tables),
        table=ancient(mask_table_of_file),
    output:
        mask="results/masks/{dataset}/{mask_dir}/{mask_stem}_mask-{mask_kind}.nii.gz",
    params:
        settings=config["masks"],
    resources:
        mem_mb=config["resources"]["masks"]["mem_mb"],
        runtime=config["resources"]["masks"]["runtime"],
    log:
        "logs/masks/{dataset}/{mask_dir}/{mask_stem}_mask-{mask_kind}.log",
    benchmark:
        "logs/benchmarks/masks/{dataset}/{mask_dir}/{mask_stem}_mask-{mask_kind}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/masks_image.py"
